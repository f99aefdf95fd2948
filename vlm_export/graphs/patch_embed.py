"""The Qwen-VL families' Conv3d patch embedding written as the MatMul it is."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patch_embed_as_linear(patch_embed: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """`patch_embed(pixel_values)` for flattened patches [N, C * T * P * P] -> [N, hidden].

    The Conv3d's kernel equals its stride, so each output row is the flattened patch times the flattened kernel.
    As a Conv, ONNX Runtime spent ~100 ms of a 448x448 image's encoding on im2col; as a MatMul it is one GEMM,
    which `--quantize` also turns into int8 with the encoder's other projections.
    """
    proj = patch_embed.proj
    weight = proj.weight.reshape(proj.out_channels, -1)
    return F.linear(pixel_values.to(weight.dtype), weight, proj.bias)
