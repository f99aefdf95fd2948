"""The float16 range check at full depth, in bounded memory: transformers' own forward in float32 on a weightless
model whose every module receives its real weights only for the span of its own call.

float16 tops out at 65504; an activation beyond it becomes inf in a float16 graph and then NaN everywhere (the
most common complaint about float16 exports). A depth-reduced copy cannot show it: the residual stream grows
with depth. Here the whole model runs: a pre-hook reads a module's parameters from the checkpoint before it runs
and a hook drops them after, recording the largest |value| of every module's output. Memory holds one module's
weights (a projection, an expert tensor), not the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_export.exporter.weightless import is_fake

logger = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0
SCAN_PROMPT = "Describe the image in detail, then tell a short story about what happens next. " * 4


@dataclass
class ActivationPeak:
    value: float
    module: str

    def overflows_float16(self) -> bool:
        return not self.value < FLOAT16_MAX


class OnDemandWeights:
    """Hooks that give each module with weightless parameters its checkpoint values only while it runs, and
    record every module's largest output magnitude. transformers' own forward of a weightless model then runs at
    full depth holding one module's weights (the range check here; the exporter's verification of models too large
    to load beside their graphs)."""

    def __init__(self, model: nn.Module, weights: Any, dtype: torch.dtype = torch.float32):
        self.weights = weights
        self.dtype = dtype
        self.peak = ActivationPeak(0.0, "")
        self._names: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(param), name)
        self._handles = []
        units = [name for name, module in model.named_modules() if name and "forward" in vars(module)]
        for name, module in model.named_modules():
            if any(name.startswith(unit + ".") for unit in units):
                fake: list[tuple[nn.Module, str]] = []  # its patched ancestor gives it its weights
            elif name in units:  # a forward replaced on the instance (an export form) may read any descendant's
                fake = [
                    (m, k) for m in module.modules() for k, p in m._parameters.items() if p is not None and is_fake(p)
                ]
            else:
                fake = [(module, k) for k, p in module._parameters.items() if p is not None and is_fake(p)]
            if fake:
                self._handles.append(module.register_forward_pre_hook(self._materialize(fake)))
            self._handles.append(module.register_forward_hook(self._record(name, bool(fake))))

    def _materialize(self, slots: list[tuple[nn.Module, str]]):
        def hook(module: nn.Module, args: Any) -> None:
            module._vlm_fake = [(owner, key, owner._parameters[key]) for owner, key in slots]  # type: ignore[attr-defined]
            for owner, key in slots:
                real = self.weights.read(self._names[id(owner._parameters[key])], self.dtype)
                owner._parameters[key] = nn.Parameter(real, requires_grad=False)

        return hook

    def _record(self, name: str, materialized: bool):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if materialized:
                for owner, key, fake in module._vlm_fake:
                    owner._parameters[key] = fake
                del module._vlm_fake
            for tensor in _tensors(output):
                if tensor.is_floating_point() and tensor.numel():
                    peak = float(tensor.detach().abs().max())
                    if not peak <= self.peak.value:
                        self.peak = ActivationPeak(peak, name)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _tensors(output: Any):
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif hasattr(output, "values") and callable(output.values):
        for item in output.values():
            yield from _tensors(item)


def _prompt_ids(model_dir: Path, count: int) -> torch.Tensor | None:
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(SCAN_PROMPT).ids[:count]
    return torch.tensor([ids], dtype=torch.int64)


def scan_activations(family: Any, model_dir: Path, files: list[Path], options: dict[str, str]) -> ActivationPeak:
    """Largest |activation| of transformers' float32 forward of the whole model: the vision tower on the vision
    graph's first verification input, the text model on a tokenized prompt."""
    from vlm_export.exporter.weightless import build_weightless

    model, weights = build_weightless(family, model_dir, files, torch.float32, options)
    hooks = OnDemandWeights(model, weights)
    try:
        with torch.no_grad():
            vision = next(s for s in family.graph_specs(model, torch.float32) if s.name == "vision_encoder")
            vision.reference(vision.verify_feeds[0])
            ids = _prompt_ids(model_dir, 64)
            if ids is not None:
                text = model.get_decoder()
                embed = text.get_input_embeddings()
                rows = weights.read(hooks._names[id(embed.weight)], torch.float32)[ids[0]]
                text(inputs_embeds=rows[None], use_cache=False)
    finally:
        hooks.remove()
    logger.info("largest activation at full depth: %.4g (%s)", hooks.peak.value, hooks.peak.module)
    return hooks.peak
