"""Generic decoder-with-KV-cache wrapper shared by every family.

Graph IO: inputs_embeds [B,S,H], position_ids (family rank, e.g. [3,B,S] for MRoPE), attention_mask int64
[B,past+S], past_key_values.{i}.key/value [B,kv_heads,past,head_dim] -> logits [B,1,V] (last position only),
present.{i}.key/value [B,kv_heads,past+S,head_dim]. Prefill passes past of length 0.

The 4D mask is built in-graph as an additive float mask (0 / finfo.min): a bool mask added to scores is
silently wrong in eager attention, and transformers' own mask factory does not export cleanly.
Families plug in extra inputs and per-layer additions (Qwen3-VL DeepStack) through `layer_hook`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class PastKeyValues:
    """The slice of transformers' `Cache` API the attention modules call: `update` concatenates and records."""

    def __init__(self, past: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.past = list(past)
        self.present: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.past)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        past_key, past_value = self.past[layer_idx]
        key = torch.cat([past_key, key_states], dim=2)
        value = torch.cat([past_value, value_states], dim=2)
        self.present[layer_idx] = (key, value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past[layer_idx][0].shape[2]


def additive_causal_mask(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, total] padding mask -> [B, 1, S, total] additive mask, causal on absolute positions."""
    total = attention_mask.shape[1]
    past_len = total - query_len
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(query_len, device=attention_mask.device) + past_len
    causal = key_pos[None, :] <= query_pos[:, None]
    allowed = causal[None, :, :] & attention_mask[:, None, :].bool()
    zero = torch.zeros((), dtype=dtype)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg)[:, None, :, :]


LayerHook = Callable[[int, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


class DecoderWithCache(nn.Module):
    """Runs a transformers text model layer by layer with an explicit cache and returns last-token logits."""

    def __init__(self, text_model: nn.Module, lm_head: nn.Module, layer_hook: LayerHook | None = None):
        super().__init__()
        self.text_model = text_model
        self.lm_head = lm_head
        self.layer_hook = layer_hook

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
    ):
        return self.run(inputs_embeds, position_ids, attention_mask, past_key_values, {})

    def run(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
        extra: dict[str, torch.Tensor],
    ):
        """The shared body; a family whose decoder takes more inputs subclasses with an explicit `forward`
        signature (the exporter traces named arguments) and passes them on in `extra` for `layer_hook`."""
        cache = PastKeyValues(past_key_values)
        mask = additive_causal_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)
        hidden = inputs_embeds
        position_embeddings = self.text_model.rotary_emb(hidden, position_ids)
        for index, layer in enumerate(self.text_model.layers):
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=True,
            )
            if self.layer_hook is not None:
                hidden = self.layer_hook(index, hidden, extra)
        last = self.text_model.norm(hidden[:, -1:, :])
        logits = self.lm_head(last)
        present = [tensor for pair in cache.present for tensor in pair]
        return (logits, *present)


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Flat ONNX input/output names of the cache, in the order `DecoderWithCache` takes and returns them."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return past, present


@dataclass
class ExtraDecoderInputs:
    """Inputs a family's decoder takes between `attention_mask` and the cache (e.g. Qwen3-VL DeepStack)."""

    names: list[str]
    # (batch, seq, generator) -> example values; called for the traced example and each verification set
    make: Callable[[int, int, torch.Generator], dict[str, torch.Tensor]]
    # (batch Dim, sequence Dim) -> dynamic axes per input name
    dynamic: Callable[[Any, Any], dict[str, dict[int, Any]]]
    axes: dict[str, dict[int, str]]
    # feeds -> extra keyword arguments of transformers' text model forward (the reference)
    reference_kwargs: Callable[[dict[str, torch.Tensor]], dict[str, Any]]


def decoder_spec(
    module: nn.Module,
    text_model: nn.Module,
    lm_head: nn.Module,
    dtype: torch.dtype,
    *,
    position_rank: int = 3,
    extra: ExtraDecoderInputs | None = None,
):
    """GraphSpec of a `DecoderWithCache` (or subclass), verified against transformers' text model with a
    `DynamicCache` on a prefill (past 0, left padding) and a decode step (past > 0, S=1)."""
    from torch.export import Dim
    from transformers import DynamicCache

    from vlm_export.graphs.registry import GraphSpec

    tc = text_model.config
    num_layers, kv_heads = tc.num_hidden_layers, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    past_names, present_names = decoder_io_names(num_layers)
    extra_names = extra.names if extra else []
    generator = torch.Generator().manual_seed(4)

    def make(batch: int, seq: int, past: int, pads: list[int]) -> dict[str, torch.Tensor]:
        mask = torch.ones(batch, past + seq, dtype=torch.int64)
        for row, pad in enumerate(pads):
            mask[row, :pad] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        # distinct values per MRoPE axis, so a graph that mixes up the axes fails verification
        position_ids = torch.stack([positions, positions + 1, positions + 2]) if position_rank == 3 else positions
        feeds = {
            "inputs_embeds": torch.randn(batch, seq, tc.hidden_size, generator=generator).to(dtype),
            "position_ids": position_ids,
            "attention_mask": mask,
        }
        if extra:
            feeds.update(
                {k: v.to(dtype) if v.is_floating_point() else v for k, v in extra.make(batch, seq, generator).items()}
            )
        for name in past_names:
            feeds[name] = torch.randn(batch, kv_heads, past, head_dim, generator=generator).to(dtype)
        return feeds

    example = make(2, 3, 4, pads=[0, 2])
    verify = [make(3, 7, 0, pads=[0, 3, 1]), make(2, 1, 9, pads=[4, 0])]

    def reference(feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        cache = DynamicCache(config=tc)
        if feeds[past_names[0]].shape[2] > 0:
            for layer in range(num_layers):
                cache.update(feeds[f"past_key_values.{layer}.key"], feeds[f"past_key_values.{layer}.value"], layer)
        out = text_model(
            inputs_embeds=feeds["inputs_embeds"],
            attention_mask=feeds["attention_mask"],
            position_ids=feeds["position_ids"],
            cache=cache,
            use_cache=True,
            **(extra.reference_kwargs(feeds) if extra else {}),
        )
        logits = lm_head(out.last_hidden_state[:, -1:, :])
        present = []
        for layer in range(num_layers):
            present += [out.cache.layers[layer].keys, out.cache.layers[layer].values]
        return [logits, *present]

    batch, seq, past, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    kv_axes = {0: batch, 2: past}
    position_axes = {1: batch, 2: seq} if position_rank == 3 else {0: batch, 1: seq}
    extra_dynamic = extra.dynamic(batch, seq) if extra else {}
    dynamic = (
        {0: batch, 1: seq},
        position_axes,
        {0: batch, 1: total},
        *(extra_dynamic[name] for name in extra_names),
        [(kv_axes, kv_axes) for _ in range(num_layers)],
    )
    example_past = [
        (example[f"past_key_values.{i}.key"], example[f"past_key_values.{i}.value"]) for i in range(num_layers)
    ]
    kv_in = {name: {0: "batch", 2: "past_sequence"} for name in past_names}
    kv_out = {name: {0: "batch", 2: "total_sequence"} for name in present_names}
    position_named = {1: "batch", 2: "sequence"} if position_rank == 3 else {0: "batch", 1: "sequence"}
    return GraphSpec(
        name="decoder",
        module=module,
        input_names=["inputs_embeds", "position_ids", "attention_mask", *extra_names, *past_names],
        output_names=["logits", *present_names],
        example_args=(
            example["inputs_embeds"],
            example["position_ids"],
            example["attention_mask"],
            *(example[name] for name in extra_names),
            example_past,
        ),
        dynamic_shapes=dynamic,
        verify_feeds=verify,
        reference=reference,
        tolerance=1e-4 if dtype == torch.float32 else 5e-2,
        input_axes={
            "inputs_embeds": {0: "batch", 1: "sequence"},
            "position_ids": position_named,
            "attention_mask": {0: "batch", 1: "total_sequence"},
            **(extra.axes if extra else {}),
            **kv_in,
        },
        output_axes={"logits": {0: "batch"}, **kv_out},
    )
