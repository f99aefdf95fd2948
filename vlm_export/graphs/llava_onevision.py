"""LLaVA-OneVision: SigLIP tower + projector per 384x384 crop, embedding merge, Qwen2 decoder with 1D RoPE.

The vision graph maps a dynamic number of crops to per-crop projected features `[crops, tokens, H]`. Packing
(anyres grid, unpadding to the original aspect ratio, the anyres_max_9 bilinear downscale, `image_newline`
columns, base-crop tokens first) depends on every image's size, so it runs on the host in numpy
(`runtime.families.llava_onevision.packing`); `image_newline` is written beside the graphs as a .npy file.
Video frames go through the same graph (`get_video_features` uses the same tower, layer, strategy and
projector); their 2x bilinear pooling and the newline row run on the host too (`...llava_onevision.video`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import Dim
from transformers import LlavaOnevisionForConditionalGeneration

from vlm_export.errors import ExportError
from vlm_export.graphs.decoder import DecoderWithCache, decoder_spec
from vlm_export.graphs.depth import LayerSelection, ends, reduce_text_config
from vlm_export.graphs.embedding import embedding_spec
from vlm_export.graphs.registry import GraphSpec, register_graph_family
from vlm_export.runtime.families.llava_onevision.packing import LlavaPackingConfig
from vlm_export.runtime.families.llava_onevision.preprocess import LlavaOnevisionImageConfig
from vlm_export.runtime.families.llava_onevision.video import LlavaOnevisionVideoConfig

IMAGE_NEWLINE_FILE = "image_newline.npy"


def video_processor_dict(model_dir: Path | None, image_processor: dict[str, Any]) -> dict[str, Any]:
    """The video processor's settings, found as transformers 5.24's ``get_video_processor_dict`` finds them:
    ``processor_config.json["video_processor"]``, else ``video_preprocessor_config.json``, else the image
    processor's ``preprocessor_config.json`` (for repos that ship no video config)."""
    if model_dir is not None and model_dir.is_dir():
        processor = model_dir / "processor_config.json"
        if processor.is_file():
            nested = json.loads(processor.read_text(encoding="utf-8")).get("video_processor")
            if isinstance(nested, dict):
                return nested
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (model_dir / name).is_file():
                return json.loads((model_dir / name).read_text(encoding="utf-8"))
    return image_processor


class LlavaCropEncoder(nn.Module):
    """Crops [n, 3, S, S] -> projected features [n, tokens_per_crop, H] (the configured layer and strategy)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        config = model.config
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        if isinstance(self.feature_layer, int):
            selected = outputs.hidden_states[self.feature_layer]
        else:
            selected = torch.cat([outputs.hidden_states[i] for i in self.feature_layer], dim=-1)
        if self.select_strategy == "default":
            selected = selected[:, 1:]
        return self.projector(selected)


class LlavaOnevisionGraphs:
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    model_class: Any = LlavaOnevisionForConditionalGeneration
    #: Checkpoint keys of the text layers and SigLIP layers, hub and transformers 5 layouts (depth reduction).
    text_layer_keys = r"^(?:model\.)?language_model\.(?:model\.)?layers\.(\d+)\."
    vision_layer_keys = r"^(?:model\.)?vision_tower\.vision_model\.encoder\.layers\.(\d+)\."

    def reduce_depth(self, config: Any) -> list[LayerSelection]:
        """Keep the first and last text layers, and the first SigLIP layer and the one the features come from."""
        text_keep = ends(config.text_config.num_hidden_layers)
        reduce_text_config(config.text_config, text_keep)
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ExportError("depth reduction of a model with several vision feature layers is not supported")
        total = config.vision_config.num_hidden_layers
        position = layer if layer >= 0 else total + 1 + layer  # index into hidden_states (0 = the embeddings)
        if position < 1:
            raise ExportError(f"vision_feature_layer {layer} selects the embeddings; nothing to reduce")
        vision_keep = sorted({0, position - 1})
        config.vision_config.num_hidden_layers = len(vision_keep)
        config.vision_feature_layer = len(vision_keep) if layer >= 0 else -1
        return [
            LayerSelection("text layers", self.text_layer_keys, text_keep),
            LayerSelection("vision layers", self.vision_layer_keys, vision_keep),
        ]

    def load_model(self, model_dir: Path, dtype: torch.dtype) -> nn.Module:
        model = self.model_class.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa", trust_remote_code=False, use_safetensors=True
        )
        return model.eval()

    def _vision_spec(self, model: nn.Module, dtype: torch.dtype) -> GraphSpec:
        size = model.config.vision_config.image_size
        generator = torch.Generator().manual_seed(0)

        def crops(n: int) -> dict[str, torch.Tensor]:
            return {"pixel_values": torch.randn(n, 3, size, size, generator=generator).to(dtype)}

        module = LlavaCropEncoder(model)

        def reference(feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            # transformers' own path up to (not including) packing: tower, layer selection, projector
            inner = model.model
            out = inner.vision_tower(feeds["pixel_values"], output_hidden_states=True, return_dict=True)
            layer = model.config.vision_feature_layer
            selected = (
                out.hidden_states[layer]
                if isinstance(layer, int)
                else torch.cat([out.hidden_states[i] for i in layer], dim=-1)
            )
            if model.config.vision_feature_select_strategy == "default":
                selected = selected[:, 1:]
            return [inner.multi_modal_projector(selected)]

        return GraphSpec(
            name="vision_encoder",
            module=module,
            input_names=["pixel_values"],
            output_names=["crop_features"],
            example_args=(crops(2)["pixel_values"],),
            dynamic_shapes=({0: Dim("num_crops")},),
            verify_feeds=[crops(3), crops(1)],
            reference=reference,
            tolerance=1e-4 if dtype == torch.float32 else 5e-2,
            input_axes={"pixel_values": {0: "num_crops"}},
            output_axes={"crop_features": {0: "num_crops"}},
        )

    def graph_specs(self, model: nn.Module, dtype: torch.dtype) -> list[GraphSpec]:
        config = model.config
        text = model.model.language_model
        return [
            self._vision_spec(model, dtype),
            embedding_spec(text.embed_tokens, config.image_token_id, config.video_token_id, dtype),
            decoder_spec(DecoderWithCache(text, model.lm_head), text, model.lm_head, dtype, position_rank=2),
        ]

    def write_assets(self, model: nn.Module, folder: Path) -> dict[str, str]:
        newline = model.model.image_newline.detach().float().numpy().astype(np.float32)
        np.save(folder / IMAGE_NEWLINE_FILE, newline)
        return {"image_newline": IMAGE_NEWLINE_FILE}

    def manifest_section(self, model: nn.Module, image_processor: dict[str, Any]) -> dict[str, Any]:
        config = model.config
        tc, vc = config.text_config, config.vision_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        preprocessing = LlavaOnevisionImageConfig.from_processor_dict(image_processor).to_dict()
        # the folder from_pretrained read (the exporter passes a local folder)
        model_dir = Path(model.name_or_path) if getattr(model, "name_or_path", None) else None
        video = video_processor_dict(model_dir, image_processor)
        preprocessing["video"] = LlavaOnevisionVideoConfig.from_processor_dict(video).to_dict()
        return {
            "preprocessing": preprocessing,
            "tokens": {"image_token_id": config.image_token_id, "video_token_id": config.video_token_id},
            "text": {
                "hidden_size": tc.hidden_size,
                "num_layers": tc.num_hidden_layers,
                "num_kv_heads": tc.num_key_value_heads,
                "head_dim": head_dim,
                "vocab_size": tc.vocab_size,
                "max_position_embeddings": tc.max_position_embeddings,
                "position_ids_shape": ["batch", "sequence"],
            },
            "vision": {
                "image_size": vc.image_size,
                "patch_size": vc.patch_size,
                "packing": LlavaPackingConfig.from_model_config(config.to_dict()).to_dict(),
            },
        }


register_graph_family(LlavaOnevisionGraphs())
