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
