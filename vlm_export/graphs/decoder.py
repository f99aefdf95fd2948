"""Generic decoder-with-KV-cache wrapper shared by every family.

Graph IO: inputs_embeds [B,S,H], position_ids (family rank, e.g. [3,B,S] for MRoPE), attention_mask int64
[B,past+S], past_key_values.{i}.key/value [B,kv_heads,capacity,head_dim] -> logits [B,1,V] (last position only),
present.{i}.key/value [B,kv_heads,capacity,head_dim]. Prefill and decode are the same graph.

The cache has a fixed capacity chosen by the caller (at least past+S). The S new keys/values are written at
position `past` (= attention_mask length - S) with ONNX `TensorScatter` (opset 24); the runtime binds each
`present` output to its `past` input buffer, so ONNX Runtime and TensorRT (IKVCacheUpdateLayer) update it in
place and no step copies the cache: the concatenating cache it replaces copied all of it every step (~9 ms of a
79 ms step at 1.5k tokens on a 0.5B-class model). Attention spans the capacity; slots at or beyond `past+S` are
masked by causality, so whatever they hold never reaches the logits. The caller keeps the capacity tight
(prompt + new tokens), because attention cost grows with it.

The 4D mask is built in-graph as an additive float mask (0 / finfo.min): a bool mask added to scores is
silently wrong in eager attention, and transformers' own mask factory does not export cleanly.
Families plug in extra inputs and per-layer additions (Qwen3-VL DeepStack) through `layer_hook`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_export.graphs.registry import PROMOTED_DOMAIN, ROWS_ATTRIBUTE, SOURCE_ATTRIBUTE

#: ONNX opset of the decoder graph: `TensorScatter` is new in opset 24.
DECODER_OPSET = 24


def write_cache(cache: torch.Tensor, update: torch.Tensor, start: torch.SymInt | int) -> torch.Tensor:
    """`cache` with `update` [B,kv_heads,S,head_dim] written at sequence position `start` of every row.

    Traced as one ONNX `TensorScatter` (in place when the output is bound to the input buffer); eager PyTorch
    runs the same update on a copy.
    """
    if torch.onnx.is_in_onnx_export():
        write_indices = torch.zeros(cache.shape[0], dtype=torch.int64) + start
        return torch.onnx.ops.symbolic(
            f"{PROMOTED_DOMAIN}::TensorScatter",
            (cache, update, write_indices),
            {"axis": -2, "mode": "linear"},
            dtype=cache.dtype,
            shape=cache.shape,
            version=1,
        )
    written = cache.clone()
    written[:, :, start : start + update.shape[2]] = update
    return written


class PastKeyValues:
    """The slice of transformers' `Cache` API the attention modules call: `update` writes the new keys/values
    into the fixed-capacity cache at `start` and records the result as that layer's present."""

    def __init__(self, past: Sequence[tuple[torch.Tensor, torch.Tensor]], start: torch.SymInt | int):
        self.past = list(past)
        self.start = start
        self.present: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.past)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        past_key, past_value = self.past[layer_idx]
        key = write_cache(past_key, key_states, self.start)
        value = write_cache(past_value, value_states, self.start)
        self.present[layer_idx] = (key, value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


def additive_causal_mask(
    attention_mask: torch.Tensor, query_len: int, capacity: int, dtype: torch.dtype
) -> torch.Tensor:
    """[B, total] padding mask -> [B, 1, S, capacity] additive mask, causal on absolute positions.

    Key slots from `total` on are beyond every query position, so causality alone masks the unwritten part
    of the cache; the padding mask is zero-extended to the capacity only to give it that width.

    A left-pad query position has no real key before it; it may attend to itself, so that no row is fully
    masked: GPU attention kernels turn an all-`finfo.min` row into NaN (scaled to -inf, then 0 * inf), and a NaN
    in a pad row's output would reach every row through the next layer's keys. What a pad row computes is never
    read: every real query masks pad keys.
    """
    total = attention_mask.shape[1]
    past_len = total - query_len
    padding = F.pad(attention_mask, (0, capacity - total))
    key_pos = torch.arange(capacity, device=attention_mask.device)
    query_pos = torch.arange(query_len, device=attention_mask.device) + past_len
    causal = key_pos[None, :] <= query_pos[:, None]
    allowed = (causal[None, :, :] & padding[:, None, :].bool()) | (key_pos[None, :] == query_pos[:, None])[None]
    zero = torch.zeros((), dtype=dtype)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg)[:, None, :, :]


LayerHook = Callable[[int, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]

#: Largest piece of the lm_head in the graph. ONNX Runtime pre-packs a MatMul weight next to its original, so
#: loading the decoder briefly needs its weights plus its largest matrix: a 151,936-row lm_head in one piece is
#: 0.5-1.2 GB on the Qwen models, and was the load-time (and Qwen3-VL-2B's overall) peak of resident memory.
LM_HEAD_SLICE_BYTES = 256 << 20


class VocabSlicedLinear(nn.Module):
    """`linear` as MatMuls over vocabulary slices of at most `slice_bytes` of weights, concatenated.

    The slices are views of the (often tied) weight, so exporting costs no copy; each becomes its own initializer,
    and `fuse_matmuls` leaves MatMuls that feed one Concat apart."""

    def __init__(self, linear: nn.Linear, slice_bytes: int):
        super().__init__()
        weight = linear.weight.detach()
        pieces = -(-weight.numel() * weight.element_size() // slice_bytes)
        rows = -(-weight.shape[0] // pieces)
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in weight.split(rows))
        source = getattr(linear.weight, SOURCE_ATTRIBUTE, None)
        if source is not None:  # a weightless model's: the exporter reads each slice's rows of the source
            for index, piece in enumerate(self.weights):
                setattr(piece, SOURCE_ATTRIBUTE, source)
                setattr(piece, ROWS_ATTRIBUTE, (index * rows, index * rows + piece.shape[0]))
        bias = linear.bias
        self.biases = (
            None
            if bias is None
            else nn.ParameterList(nn.Parameter(b, requires_grad=False) for b in bias.detach().split(rows))
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        biases = list(self.biases) if self.biases is not None else [None] * len(self.weights)
        return torch.cat([F.linear(hidden, w, b) for w, b in zip(self.weights, biases, strict=True)], dim=-1)


def sliced_lm_head(lm_head: nn.Module) -> nn.Module:
    """`lm_head` cut into vocabulary slices when its weight exceeds LM_HEAD_SLICE_BYTES (see there)."""
    if not isinstance(lm_head, nn.Linear):
        return lm_head
    weight = lm_head.weight
    if weight.numel() * weight.element_size() <= LM_HEAD_SLICE_BYTES:
        return lm_head
    return VocabSlicedLinear(lm_head, LM_HEAD_SLICE_BYTES)


class DecoderWithCache(nn.Module):
    """Runs a transformers text model layer by layer with an explicit cache and returns last-token logits."""

    def __init__(self, text_model: nn.Module, lm_head: nn.Module, layer_hook: LayerHook | None = None):
        super().__init__()
        self.text_model = text_model
        self.lm_head = sliced_lm_head(lm_head)
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
        query_len, capacity = inputs_embeds.shape[1], past_key_values[0][0].shape[2]
        cache = PastKeyValues(past_key_values, start=attention_mask.shape[1] - query_len)
        mask = additive_causal_mask(attention_mask, query_len, capacity, inputs_embeds.dtype)
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
    `DynamicCache` on a prefill (past 0, left padding) and a decode step (past > 0, S=1).

    The verification caches are larger than needed and their unused slots hold random values: the logits
    must not see them, and `present` must equal the input buffer with exactly the new positions written.
    """
    from torch.export import Dim
    from transformers import DynamicCache

    from vlm_export.graphs.registry import GraphSpec

    tc = text_model.config
    num_layers, kv_heads = tc.num_hidden_layers, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    past_names, present_names = decoder_io_names(num_layers)
    extra_names = extra.names if extra else []
    generator = torch.Generator().manual_seed(4)

    def make(batch: int, seq: int, past: int, pads: list[int], spare: int) -> dict[str, torch.Tensor]:
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
            capacity = past + seq + spare
            feeds[name] = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator).to(dtype)
        return feeds

    example = make(2, 3, 4, pads=[0, 2], spare=2)
    verify = [make(3, 7, 0, pads=[0, 3, 1], spare=5), make(2, 1, 9, pads=[4, 0], spare=3), make(1, 2, 3, [0], 0)]

    def run_reference(feeds: dict[str, torch.Tensor], attention_mask: torch.Tensor):
        seq = feeds["inputs_embeds"].shape[1]
        past = feeds["attention_mask"].shape[1] - seq
        cache = DynamicCache(config=tc)
        if past > 0:
            for layer in range(num_layers):
                cache.update(
                    feeds[f"past_key_values.{layer}.key"][:, :, :past],
                    feeds[f"past_key_values.{layer}.value"][:, :, :past],
                    layer,
                )
        return text_model(
            inputs_embeds=feeds["inputs_embeds"],
            attention_mask=attention_mask,
            position_ids=feeds["position_ids"],
            cache=cache,
            use_cache=True,
            **(extra.reference_kwargs(feeds) if extra else {}),
        )

    def reference(feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        mask = feeds["attention_mask"]
        seq = feeds["inputs_embeds"].shape[1]
        past = mask.shape[1] - seq
        out = run_reference(feeds, mask)
        # Left-pad positions write keys/values no real query reads; what the graph writes there (each pad query
        # attends to itself, see `additive_causal_mask`) is what transformers' layers give under that 4D mask.
        pads = mask[:, past:] == 0
        padded = run_reference(feeds, additive_causal_mask(mask, seq, past + seq, dtype)) if pads.any() else None
        logits = lm_head(out.last_hidden_state[:, -1:, :])
        present = []
        for layer in range(num_layers):
            for kind in ("key", "value"):
                grown = getattr(out.cache.layers[layer], f"{kind}s").clone()
                if padded is not None:
                    at_pads = getattr(padded.cache.layers[layer], f"{kind}s")[:, :, past:]
                    grown[:, :, past:] = torch.where(pads[:, None, :, None], at_pads, grown[:, :, past:])
                buffer = feeds[f"past_key_values.{layer}.{kind}"].clone()
                buffer[:, :, : past + seq] = grown
                present.append(buffer)
        return [logits, *present]

    batch, seq, capacity, total = Dim("batch"), Dim("sequence"), Dim("cache_capacity"), Dim("total_sequence")
    kv_axes = {0: batch, 2: capacity}
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
    kv_in = {name: {0: "batch", 2: "cache_capacity"} for name in past_names}
    kv_out = {name: {0: "batch", 2: "cache_capacity"} for name in present_names}
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
        opset=DECODER_OPSET,
        input_axes={
            "inputs_embeds": {0: "batch", 1: "sequence"},
            "position_ids": position_named,
            "attention_mask": {0: "batch", 1: "total_sequence"},
            **(extra.axes if extra else {}),
            **kv_in,
        },
        output_axes={"logits": {0: "batch"}, **kv_out},
    )
