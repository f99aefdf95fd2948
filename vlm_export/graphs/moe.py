"""Export forms of Qwen3-VL-MoE's sparse MoE blocks, behind one switch: :func:`apply_moe_form`.

transformers' default experts implementation (``grouped_mm``) and its ``eager`` one do not export: both loop
over the experts a batch happens to hit (data-dependent), and the legacy exporter bakes the example's experts
in. Three forms export without baking anything in; all keep transformers' routing exactly (softmax over all
experts in fp32, top-k, renormalised over the k; Qwen3-VL-MoE's router in transformers 5.24 always
renormalises, whatever ``norm_topk_prob`` says):

``batched_mm``
    transformers' own ``batched_mm`` experts implementation: every (token, selected expert) pair gathers its
    expert's weights (``GatherND`` on ``[E, 2I, H]`` / ``[E, H, I]``) and runs a batched MatMul. ONNX ops:
    Gemm, Softmax, TopK, ReduceSum, Div, GatherND, MatMul, Split, Sigmoid, Mul, Expand, Reshape, Squeeze,
    Unsqueeze, Shape, Concat. Compute is the sparse k/E, but the gathered weights are ``T*k*3*I*H`` elements
    of temporaries (~18 GB fp32 for 128 tokens at the 30B-A3B geometry H=2048, I=768, k=8): decode and
    short inputs only.
``dense``
    every expert on every token: one 2D Gemm against all experts' ``[gate; up]`` rows (``[E*2I, H]``, a
    reshape of ``gate_up_proj``), SwiGLU, activations scaled by a ``[T, E]`` routing-weight matrix (zeros
    off the top-k; ScatterElements from transformers' own router), one 2D MatMul against all experts' down
    rows (``[E*I, H]``). ONNX ops: Gemm, MatMul, Softmax, TopK, ReduceSum, Div, ScatterElements, Split,
    Sigmoid, Mul, Reshape, Expand, Squeeze, Unsqueeze, Shape, Concat. No loops, no data-dependent shapes.
    Compute is E/k times the sparse one (16x for 30B-A3B); temporaries ~``T*E*3*I`` elements.
``ort_moe``
    ONNX Runtime's fused ``com.microsoft.MoE`` contrib op, emitted with ``torch.onnx.ops.symbolic``. It gets
    the router logits and does softmax over all experts, top-k and renormalisation itself (``k``,
    ``normalize_routing_weights=1``, ``use_sparse_mixer=0``): transformers' routing, checked against ORT's
    CPU kernel source (moe_cpu.cc: full softmax, partial_sort, divide by the top-k sum).
    ``activation_type="swiglu"``, ``activation_alpha=1``, ``activation_beta=0``, no ``swiglu_limit``:
    ``silu(gate) * up``. The CPU kernel only accepts interleaved ``[g0, u0, g1, u1, ...]`` FC1 rows
    (``swiglu_fusion=1``; it rejects 2) and runs float32/float16, not bfloat16.

Weights in the layout the graph wants: ``ort_moe`` needs ``gate_up_proj`` interleaved and ``dense`` wants
``down_proj`` as ``[E, I, H]``. Re-laying them with graph ops does not work at real size: ONNX Runtime 1.32 did
not constant-fold a 1.6 GB Reshape/Transpose chain at session creation (it ran on every call: 320 ms for one
token vs 24 ms), and onnxscript's optimizer does fold a large Transpose at export but took ~45 s per
30B-A3B layer. So :func:`apply_moe_form` registers non-persistent buffers that are strided *views* of the
parameters (no extra torch memory, no copy, nothing in ``state_dict``); the exporter writes them out in the
view's order, so the ONNX file holds the op's layout and the graph only reshapes them (an alias in ORT).
Apply the form after any ``.to(dtype/device)``: moving afterwards would copy the views.

Which target runs which form:

* ONNX Runtime CPU: all three (tests/test_moe_forms.py checks each against transformers, <= 1e-5 fp32).
* TensorRT (ONNX parser): ``dense`` and ``batched_mm`` use only ONNX-domain operators listed as supported in
  onnx-tensorrt's docs/operators.md (10.1-GA), with its restrictions met (TopK ``sorted=1`` and K < 3840;
  ReduceSum / Squeeze / Unsqueeze axes constant; no Loop / If / NonZero): checked by the tests on the
  exported graphs. NVIDIA's ONNX opset guide gives opset 25 as the maximum for TensorRT 11.x (10.0's list
  says opsets 9-20). No TensorRT engine has been built from either form here: parser acceptance, speed and
  ``batched_mm``'s GatherND memory under TensorRT are unverified. ``ort_moe`` cannot run on TensorRT:
  ``com.microsoft.MoE`` is not an ONNX-domain operator and the parser has no importer for it (a plugin would
  be needed).

Patching is per module instance (``block.forward``, registered buffers), never per class, so other models
in the process are untouched. ``dense`` and ``ort_moe`` take their form only while exporting
(``torch.compiler.is_exporting()`` / ``torch.onnx.is_in_onnx_export()``); eager calls run transformers' own
forward with the model's experts implementation, so the exporter's verification (ONNX Runtime against the
same model in eager) compares the exported form with transformers rather than with itself.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_export.graphs.registry import derived_from

logger = logging.getLogger(__name__)

MOE_FORMS = ("batched_mm", "dense", "ort_moe")

_FORM_ATTR = "_vlm_export_moe_form"
#: ort_moe: ``gate_up_proj`` viewed as [E, I, 2, H] (interleaved gate/up rows once flattened).
FC1_INTERLEAVED = "gate_up_proj_interleaved"
#: dense: ``down_proj`` viewed as [E, I, H] (all experts' down rows stacked once flattened).
DOWN_STACKED = "down_proj_stacked"


def sparse_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every sparse MoE block: a router ``gate`` plus fused 3D ``experts`` weights.

    Matched by structure (not class name) so a bare block, a text model or the whole VLM all work.
    """
    blocks = []
    for name, module in model.named_modules():
        gate = getattr(module, "gate", None)
        experts = getattr(module, "experts", None)
        if (
            isinstance(gate, nn.Module)
            and isinstance(getattr(gate, "weight", None), torch.Tensor)
            and hasattr(gate, "top_k")
            and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
            and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        ):
            blocks.append((name, module))
    return blocks


def _check_layout(experts: nn.Module, form: str) -> None:
    """dense/ort_moe read the weights directly: only transformers 5.24's Qwen3-VL-MoE layout is handled."""
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
        raise NotImplementedError(f"moe form {form!r} handles untransposed, bias-free fused experts only")
    if not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True):
        raise NotImplementedError(f"moe form {form!r} needs concatenated [gate; up] experts weights")
    num_experts, two_inter, hidden = experts.gate_up_proj.shape
    if tuple(experts.down_proj.shape) != (num_experts, hidden, two_inter // 2):
        raise NotImplementedError(
            f"moe form {form!r}: unexpected expert shapes gate_up_proj {tuple(experts.gate_up_proj.shape)}, "
            f"down_proj {tuple(experts.down_proj.shape)} (expected [E, 2I, H] and [E, H, I])"
        )
    if form == "ort_moe":
        act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"com.microsoft.MoE's swiglu is silu(gate) * up; this model uses {act!r}")


def interleaved_gate_up_view(gate_up_proj: torch.Tensor) -> torch.Tensor:
    """[E, 2I, H] ``[gate; up]`` rows -> [E, I, 2, H] view (no copy) that flattens to ``[g0, u0, g1, u1, ...]``."""
    num_experts, two_inter, hidden = gate_up_proj.shape
    return gate_up_proj.detach().view(num_experts, 2, two_inter // 2, hidden).transpose(1, 2)


def stacked_down_view(down_proj: torch.Tensor) -> torch.Tensor:
    """[E, H, I] -> [E, I, H] view (no copy) that flattens to the [E*I, H] right operand of one 2D MatMul."""
    return down_proj.detach().permute(0, 2, 1)


def dense_moe_forward(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by a [T, E] routing matrix (zeros off the top-k).

    Each projection is ONE 2D product over all experts side by side (no batched weight gathers, no weight
    transposes in the graph); routing weights scale the activations, so the down projection also sums over
    the experts.
    """
    batch, seq, hidden = hidden_states.shape
    x = hidden_states.reshape(-1, hidden)
    _, top_weights, top_index = block.gate(x)  # transformers' router: softmax, top-k, renormalise
    experts = block.experts
    num_experts, two_inter, _ = experts.gate_up_proj.shape
    inter = two_inter // 2
    routing = torch.zeros(x.shape[0], num_experts, dtype=top_weights.dtype, device=x.device)
    routing = routing.scatter(1, top_index, top_weights)  # ScatterElements -> [T, E]

    gate_up = F.linear(x, experts.gate_up_proj.reshape(num_experts * two_inter, hidden))  # Gemm, transB
    gate, up = gate_up.reshape(-1, num_experts, two_inter).chunk(2, dim=-1)
    act = experts.act_fn(gate) * up * routing.to(x.dtype).unsqueeze(-1)  # [T, E, I]
    down = getattr(experts, DOWN_STACKED, None)
    if down is None:
        down = stacked_down_view(experts.down_proj)
    out = act.reshape(-1, num_experts * inter) @ down.reshape(num_experts * inter, hidden)
    return out.reshape(batch, seq, hidden)


def ort_moe_symbolic(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The block as one ``com.microsoft.MoE`` node; only meaningful inside ``torch.onnx.export(dynamo=True)``.

    Outside an export the symbolic op returns zeros: call the block (its eager path) instead.
    """
    batch, seq, hidden = hidden_states.shape
    x = hidden_states.reshape(-1, hidden)
    logits = F.linear(x, block.gate.weight)  # the op applies softmax / top-k / renormalisation itself
    experts = block.experts
    fc1 = getattr(experts, FC1_INTERLEAVED, None)
    if fc1 is None:
        fc1 = interleaved_gate_up_view(experts.gate_up_proj)
    out = torch.onnx.ops.symbolic(
        "com.microsoft::MoE",
        (x, logits, fc1.reshape(experts.gate_up_proj.shape), None, experts.down_proj),
        {
            "k": int(block.gate.top_k),
            "activation_type": "swiglu",
            "swiglu_fusion": 1,
            "normalize_routing_weights": 1,
            "use_sparse_mixer": 0,
            "activation_alpha": 1.0,
            "activation_beta": 0.0,
        },
        dtype=x.dtype,
        shape=x.shape,
        version=1,
    )
    return out.reshape(batch, seq, hidden)


def _dense_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Instance forward of form "dense": dense while exporting, transformers' forward in eager."""
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return dense_moe_forward(self, hidden_states)
    return type(self).forward(self, hidden_states)


def _ort_moe_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Instance forward of form "ort_moe": the contrib op under torch.onnx.export, transformers' forward else."""
    if torch.onnx.is_in_onnx_export():
        return ort_moe_symbolic(self, hidden_states)
    return type(self).forward(self, hidden_states)


_EXPORT_FORWARDS = {"dense": _dense_forward, "ort_moe": _ort_moe_forward}


def _restore(block: nn.Module) -> None:
    block.__dict__.pop("forward", None)
    block.experts.__dict__.pop("forward", None)
    block.__dict__.pop(_FORM_ATTR, None)
    for name in (FC1_INTERLEAVED, DOWN_STACKED):
        block.experts._buffers.pop(name, None)


def apply_moe_form(model: nn.Module, form: str) -> None:
    """Make every sparse MoE block of ``model`` export as ``form`` (one of :data:`MOE_FORMS`).

    ``model`` may be a whole transformers Qwen3-VL-MoE model, its text model, or one block. Calling again with
    another form switches (earlier patches are undone first).
    """
    if form not in MOE_FORMS:
        raise ValueError(f"unknown moe form {form!r}; choose one of {MOE_FORMS}")
    blocks = sparse_moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no sparse MoE block (router `gate` + fused `experts`)")
    for _, block in blocks:
        _restore(block)
        if form != "batched_mm":
            _check_layout(block.experts, form)

    if form == "batched_mm":
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation("batched_mm")
        else:  # a bare block or layer stack: switch its experts modules, not the config they share
            from transformers.integrations.moe import batched_mm_experts_forward

            for _, block in blocks:
                block.experts.forward = types.MethodType(batched_mm_experts_forward, block.experts)
    else:
        for _, block in blocks:
            experts = block.experts
            if form == "ort_moe":
                view = interleaved_gate_up_view(experts.gate_up_proj)
                view = derived_from(view, experts.gate_up_proj, interleaved_gate_up_view)
                experts.register_buffer(FC1_INTERLEAVED, view, persistent=False)
            else:
                view = derived_from(stacked_down_view(experts.down_proj), experts.down_proj, stacked_down_view)
                experts.register_buffer(DOWN_STACKED, view, persistent=False)
            block.forward = types.MethodType(_EXPORT_FORWARDS[form], block)
    for _, block in blocks:
        setattr(block, _FORM_ATTR, form)
    logger.info("moe form %s on %d sparse block(s)", form, len(blocks))


def moe_form(model: nn.Module) -> str | None:
    """The form :func:`apply_moe_form` put on ``model``'s sparse blocks (None: untouched or mixed)."""
    forms: set[Any] = {getattr(block, _FORM_ATTR, None) for _, block in sparse_moe_blocks(model)}
    return forms.pop() if len(forms) == 1 else None
