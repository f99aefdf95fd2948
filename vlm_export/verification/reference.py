"""transformers' outputs on a case: its own processor and `generate()`, observed stage by stage (torch).

The model is transformers' own class, unmodified (no export-time patches such as the MoE forms), in float32. When
it fits in memory it is loaded; when it does not (a 7B model on a 24 GB machine), it is built without weights and
each module receives its checkpoint weights only for the span of its own call (`OnDemandWeights`): the same
forward and `generate()` at full depth in the memory of one module's weights, just slower (every forward reads
the weights again).

Two hooks watch the run: the vision tower's input (what preprocessing produced) and the language model's first
call (the merged input embeddings and the position ids of the prefill). Vision embeddings are the merged rows at
the image / video placeholder tokens, so both sides are compared in prompt order whatever order each runs its media.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_export.errors import ExportError, InputError
from vlm_export.verification.golden import SAMPLE_BUDGET, TOP_K, Conversation, Reference, Sampled, TopLogits

logger = logging.getLogger(__name__)

#: Loading the model needs about this many times its float32 parameters, plus `LOAD_OVERHEAD` bytes.
LOAD_MEMORY_FACTOR = 1.3
LOAD_OVERHEAD = 1.5e9
WEIGHT_MODES = ("auto", "load", "on-demand")


def loads_in_memory(parameters: int) -> bool:
    """Whether transformers' float32 model of `parameters` parameters can be loaded in the memory available now
    (else it runs on demand: correct, but every forward reads all weights again)."""
    from vlm_export.exporter.resources import available_memory

    return LOAD_MEMORY_FACTOR * 4 * parameters + LOAD_OVERHEAD <= available_memory()


class TransformersReference:
    """transformers' processor and float32 model for one checkpoint; `run` gives the `Reference` of a case."""

    def __init__(self, model_dir: Path, weights: str = "auto"):
        from vlm_export.exporter.checkpoint import validate_checkpoint
        from vlm_export.exporter.model_source import read_model_type
        from vlm_export.graphs.registry import graph_family_for

        if weights not in WEIGHT_MODES:
            raise ExportError(f"--weights {weights} is not one of {', '.join(WEIGHT_MODES)}")
        self.model_dir = Path(model_dir)
        self.model_type = read_model_type(self.model_dir)
        family = graph_family_for(self.model_type)
        files = validate_checkpoint(self.model_dir)
        self._hooks: Any = None
        model, checkpoint = _weightless(family.model_class, self.model_dir, files)
        parameters = sum(p.numel() for p in model.parameters())
        if weights == "auto":
            weights = "load" if loads_in_memory(parameters) else "on-demand"
        if weights == "load":
            model = checkpoint = None
            try:
                model = family.model_class.from_pretrained(
                    self.model_dir, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
                ).eval()
            except (OSError, ValueError) as error:
                raise ExportError(f"cannot load {self.model_dir} with transformers: {error}") from None
            self.weights = "loaded"
        else:
            from vlm_export.exporter.activation_scan import OnDemandWeights

            self._hooks = OnDemandWeights(model, checkpoint)
            self.weights = "on demand (one module's weights at a time)"
            logger.info("transformers runs %s with each module's weights read for its own call", self.model_dir.name)
        self.model = model
        self.processor = _processor(self.model_dir, self.model_type)
        self.video_processor_error = getattr(self.processor, "_vlm_video_error", None)
        config = model.config
        self.placeholders = [
            t
            for t in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
            if t is not None
        ]

    def describe(self) -> dict[str, Any]:
        import transformers

        return {
            "library": "transformers",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "model_class": type(self.model).__name__,
            "dtype": "float32",
            "weights": self.weights,
        }

    def close(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        self.model = None

    # -- one case -----------------------------------------------------------------------------------------------
    def run(
        self,
        conversations: list[Conversation],
        new_tokens: int,
        budget: int | None = SAMPLE_BUDGET,
        top_k: int | None = TOP_K,
    ) -> Reference:
        """transformers' outputs on a batch of conversations; `budget` / `top_k` None keep whole arrays."""
        inputs, kinds = self._inputs(conversations)
        captured: dict[str, Any] = {"pixels": [], "decoder": None}
        encoder = self.model.get_encoder(modality="image")
        handles = [
            encoder.register_forward_pre_hook(_capture_pixels(captured), with_kwargs=True),
            self.model.get_decoder().register_forward_pre_hook(_capture_decoder(captured), with_kwargs=True),
        ]
        try:
            with torch.no_grad():
                out = self.model.generate(
                    **inputs,
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
        finally:
            for handle in handles:
                handle.remove()
        ids = inputs["input_ids"].numpy()
        mask = inputs["attention_mask"].numpy().astype(bool)
        merged = captured["decoder"]["inputs_embeds"].float().numpy()
        placeholder = np.isin(ids, self.placeholders) & mask
        text = merged[mask & ~placeholder]
        pixels = None
        if captured["pixels"] and len(kinds) == 1:  # images and videos mixed: each side orders them its own way
            pixels = Sampled.of(np.concatenate([p.float().numpy() for p in captured["pixels"]]), budget)
        positions = captured["decoder"].get("position_ids")
        return Reference(
            prompt_ids=[row[m].tolist() for row, m in zip(ids, mask, strict=True)],
            tokens=out.sequences[:, ids.shape[1] :].numpy().astype(np.int64),
            logits=TopLogits.of(np.stack([step.float().numpy() for step in out.logits], axis=1), top_k),
            text=Sampled.of(text, budget),
            vision=Sampled.of(merged[placeholder], budget) if placeholder.any() else None,
            pixels=pixels,
            positions=None if positions is None else positions.numpy().astype(np.int64),
        )

    def _inputs(self, conversations: list[Conversation]) -> tuple[Any, set[str]]:
        """transformers' processor on the conversations, as `apply_chat_template` would call it: the template's
        text, images per conversation, videos decoded by its PyAV loader with their metadata."""
        from transformers.image_utils import load_image

        processor = self.processor
        texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        parts = [[p for m in c if isinstance(m["content"], list) for p in m["content"]] for c in conversations]
        try:
            images = [[load_image(p["path"]) for p in row if p.get("type") == "image"] for row in parts]
        except (ValueError, OSError) as error:
            raise InputError(f"transformers cannot read an image: {str(error).splitlines()[0]}") from None
        videos = [p for row in parts for p in row if p.get("type") == "video"]
        kinds = {p["type"] for row in parts for p in row if p.get("type") in ("image", "video")}
        kwargs: dict[str, Any] = {}
        if videos:
            if self.video_processor_error is not None:
                raise InputError(f"transformers cannot process videos here: {self.video_processor_error}")
            frames, metadata, options = _load_videos(videos)
            kwargs.update(videos=frames, video_metadata=metadata, **options)
        return (
            processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt", **kwargs),
            kinds,
        )


def _weightless(model_class: Any, model_dir: Path, files: list[Path]) -> tuple[Any, Any]:
    """transformers' model class without weights (small tensors real) and its checkpoint reader; no export options."""
    from transformers import GenerationConfig

    from vlm_export.exporter.checkpoint import CheckpointWeights
    from vlm_export.exporter.weightless import load_small_tensors, model_config, weightless_model

    model = weightless_model(model_class, model_config(model_class, model_dir), torch.float32)
    checkpoint = CheckpointWeights(files, model)
    missing = checkpoint.missing()
    if missing:
        raise ExportError(f"{model_dir}'s weights lack {len(missing)} of the model's tensors (e.g. {missing[0]})")
    load_small_tensors(model, checkpoint, torch.float32)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model, checkpoint


def _processor(model_dir: Path, model_type: str) -> Any:
    """transformers' processor class for `model_type` with its PIL image processor (what the runtime reproduces)
    and its video processor when torchvision is there."""
    import transformers

    from vlm_export.testing.reference import processor_class_for, vl_processor

    video_processor, error = None, None
    try:
        video_processor = transformers.AutoVideoProcessor.from_pretrained(model_dir)
        if getattr(video_processor, "cap_pixels_per_frame", False) is None:
            video_processor.cap_pixels_per_frame = False  # its default (None) warns, then behaves as False
    except (ImportError, ValueError, OSError, TypeError) as exc:  # its video processors are torchvision classes
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    processor = vl_processor(model_dir, processor_class_for(model_type), video_processor=video_processor)
    processor._vlm_video_error = error
    return processor


def _load_videos(parts: list[dict[str, Any]]) -> tuple[list[np.ndarray], list[Any], dict[str, Any]]:
    """Every frame of each video (transformers' PyAV loader) and its metadata; the processor samples them with the
    per-video fps / num_frames of the message parts, as the runtime reads them (one setting for all videos)."""
    from transformers.video_utils import VideoMetadata, load_video

    frames, metadata, settings = [], [], set()
    for part in parts:
        video, meta = load_video(part["path"], backend="pyav")
        frames.append(video)
        metadata.append(
            VideoMetadata(
                total_num_frames=meta.total_num_frames,
                fps=meta.fps,
                width=meta.width,
                height=meta.height,
                duration=meta.duration,
            )
        )
        settings.add(tuple(sorted((k, part[k]) for k in ("fps", "num_frames") if part.get(k) is not None)))
    if len(settings) > 1:
        raise InputError("the videos of one case must share --fps / --num-frames")
    options: dict[str, Any] = dict(settings.pop())
    if options:
        options["do_sample_frames"] = True
        if "num_frames" in options:
            options["fps"] = None  # Qwen3-VL's processor default fps=2 would clash with num_frames
    return frames, metadata, options


def _capture_pixels(captured: dict[str, Any]):
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        if captured["decoder"] is None:  # the prefill's media only
            pixels = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            captured["pixels"].append(pixels.detach())

    return hook


def _capture_decoder(captured: dict[str, Any]):
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        if captured["decoder"] is None:
            captured["decoder"] = {
                "inputs_embeds": kwargs["inputs_embeds"].detach(),
                "position_ids": None if kwargs.get("position_ids") is None else kwargs["position_ids"].detach(),
            }

    return hook
