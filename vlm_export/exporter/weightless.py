"""The model as transformers builds it, without its weights: graphs are traced on FakeTensor parameters.

Tracing needs every parameter's shape and dtype, never its values. The model is constructed with its parameters
on the meta device (no memory), then each becomes a FakeTensor on the CPU in the export dtype; buffers (rotary
inverse frequencies and the like) are computed as usual, and small parameters (norms, biases, LLaVA's
image_newline) are read for real, so every constant the graph optimizer may fold has its true value. The traced
graph names each large weight by its parameter; `deferred_weights` reads them from the checkpoint while writing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_export.graphs.registry import SOURCE_ATTRIBUTE

#: Parameters up to this many bytes (in the export dtype) are read for real when the skeleton is built.
REAL_PARAMETER_BYTES = 1 << 20


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, every registered parameter is moved to the meta device (buffers are not)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def is_fake(tensor: Any) -> bool:
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return isinstance(tensor, torch.Tensor) and _is_fake(tensor)


def weightless_model(model_class: Any, config: Any, dtype: torch.dtype, weights: Any | None = None) -> nn.Module:
    """`model_class(config)` with FakeTensor parameters of `dtype`; parameters of at most REAL_PARAMETER_BYTES
    (and persistent buffers the checkpoint stores) are read from `weights` (a `CheckpointWeights`) when given."""
    from torch._subclasses.fake_tensor import FakeTensor
    from transformers.modeling_utils import local_torch_dtype

    config._attn_implementation = "sdpa"
    with local_torch_dtype(dtype, model_class.__name__), parameters_on_meta():
        model = model_class(config)
    model.tie_weights()
    mode = _fake_mode()
    replaced: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                meta = torch.empty(param.shape, dtype=dtype, device="meta")
                fake = nn.Parameter(FakeTensor(mode, meta, torch.device("cpu")), requires_grad=False)
                setattr(fake, SOURCE_ATTRIBUTE, f"{module_name}.{name}" if module_name else name)
                replaced[id(param)] = fake
            module._parameters[name] = replaced[id(param)]
    model.eval()
    if weights is not None:
        load_small_tensors(model, weights, dtype)
    return model


def load_small_tensors(model: nn.Module, weights: Any, dtype: torch.dtype) -> None:
    """Give parameters of at most REAL_PARAMETER_BYTES, and stored buffers, their checkpoint values."""
    real: dict[int, nn.Parameter] = {}
    for full_name, param in model.named_parameters(remove_duplicate=False):
        if param.numel() * param.element_size() > REAL_PARAMETER_BYTES or full_name not in weights:
            continue
        if id(param) not in real:
            real[id(param)] = nn.Parameter(weights.read(full_name, dtype).contiguous(), requires_grad=False)
        owner, _, leaf = full_name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = real[id(param)]
    for full_name, buffer in model.named_buffers():
        if full_name in weights:
            owner, _, leaf = full_name.rpartition(".")
            module = model.get_submodule(owner)
            module._buffers[leaf] = weights.read(full_name, buffer.dtype).contiguous()


def model_config(model_class: Any, model_dir: Path) -> Any:
    """The model's config as `from_pretrained` reads it (no remote code), naming the folder as it does."""
    config = model_class.config_class.from_pretrained(model_dir, trust_remote_code=False)
    config.name_or_path = str(model_dir)
    return config


def build_weightless(
    family: Any, model_dir: Path, files: list[Path], dtype: torch.dtype, options: dict[str, str]
) -> tuple[nn.Module, Any]:
    """A family's model for tracing (weightless, small tensors real, export options applied) and the reader of its
    checkpoint; refuses a checkpoint that lacks any of the model's parameters."""
    from vlm_export.errors import ExportError
    from vlm_export.exporter.checkpoint import CheckpointWeights

    config = model_config(family.model_class, model_dir)
    model = weightless_model(family.model_class, config, dtype)
    weights = CheckpointWeights(files, model)
    missing = weights.missing()
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ExportError(
            f"{model_dir}'s weights lack {len(missing)} of the model's tensors ({shown}); is the download complete "
            "and config.json the one of these weights?"
        )
    load_small_tensors(model, weights, dtype)
    _load_generation_config(model, model_dir)
    prepare = getattr(family, "prepare_model", None)
    if prepare is not None:
        prepare(model, **options)
    return model, weights


def _load_generation_config(model: nn.Module, model_dir: Path) -> None:
    """As `from_pretrained` does: the folder's generation_config.json when there is one."""
    from transformers import GenerationConfig

    if (model_dir / "generation_config.json").is_file() and getattr(model, "can_generate", lambda: False)():
        with contextlib.suppress(OSError, ValueError):  # from_pretrained, too, keeps the config's defaults then
            model.generation_config = GenerationConfig.from_pretrained(model_dir)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
