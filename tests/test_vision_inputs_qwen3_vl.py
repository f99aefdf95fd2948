"""Host-side Qwen3-VL vision encoder inputs equal transformers 5.24 on many grids, and stay torch-free.

Checked against ``transformers.vision_utils`` (called with the arguments ``Qwen3VLVisionModel.forward``
uses) and end to end: the tiny dense and MoE vision towers give bit-identical outputs when fed our inputs
with ``grid_thw=None`` instead of computing them from ``grid_thw``.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vlm_export.runtime.families.qwen3_vl.vision_inputs import qwen3_vl_vision_inputs, vision_interpolation

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
vision_utils = pytest.importorskip("transformers.vision_utils")


def _random_grids(rng: np.random.Generator, merge: int, count: int, max_side: int = 80) -> np.ndarray:
    t = rng.integers(1, 4, size=count)
    h = rng.integers(1, max_side // merge + 1, size=count) * merge
    w = rng.integers(1, max_side // merge + 1, size=count) * merge
    return np.stack([t, h, w], axis=1).astype(np.int64)


FIXED_GRIDS = [
    [[1, 2, 2]],  # one merged token: size - 1 == 1 on both axes
    [[1, 4, 4]],  # as large as the tiny 4x4 table: identity resampling
    [[1, 4, 6], [1, 8, 4]],
    [[2, 4, 4]],
    [[1, 48, 48]],  # as large as the real 48x48 table
    [[1, 96, 96], [3, 14, 30]],
    [[1, 80, 2], [1, 2, 80], [4, 8, 8]],
    [[1, 24, 24], [1, 36, 28], [2, 12, 18]],
]


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    cases = [np.array(g, dtype=np.int64) for g in FIXED_GRIDS]
    cases += [_random_grids(rng, 2, int(rng.integers(1, 6))) for _ in range(30)]
    return cases


CASES = _cases()


def _reference(grid: np.ndarray, merge: int, side: int) -> dict[str, np.ndarray]:
    """What Qwen3VLVisionModel.forward computes from grid_thw (its interpolation mode and alignment)."""
    tg = torch.from_numpy(grid)
    indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
        tg, num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=merge
    )
    return {
        "position_ids": vision_utils.get_vision_position_ids(tg, merge).numpy(),
        "cu_seqlens": vision_utils.get_vision_cu_seqlens(tg).numpy(),
        "interp_indices": indices.numpy(),
        "interp_weights": weights.numpy(),
    }


@pytest.mark.parametrize("side", [48, 4, 8, 7])  # 2304 (real), 16 (tiny), 64 (tiny_models), odd
@pytest.mark.parametrize("grid", CASES, ids=lambda g: "_".join("x".join(map(str, r)) for r in g.tolist()))
def test_matches_transformers_vision_utils(grid: np.ndarray, side: int) -> None:
    ours = qwen3_vl_vision_inputs(grid, merge_size=2, num_grid_per_side=side)
    ref = _reference(grid, 2, side)
    assert set(ours) == set(ref)
    for key in ("position_ids", "cu_seqlens", "interp_indices"):
        assert ours[key].dtype == np.int64, key
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    assert ours["interp_weights"].dtype == np.float32
    np.testing.assert_array_equal(ours["interp_weights"], ref["interp_weights"])  # bit-identical
    n = int(grid.prod(axis=1).sum())
    assert ours["interp_indices"].shape == ours["interp_weights"].shape == (n, 4)
    assert ours["interp_indices"].min() >= 0 and ours["interp_indices"].max() < side * side
    np.testing.assert_allclose(ours["interp_weights"].sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("merge", [1, 3])
def test_other_merge_sizes(merge: int) -> None:
    rng = np.random.default_rng(merge)
    for _ in range(10):
        grid = _random_grids(rng, merge, int(rng.integers(1, 5)))
        ours = qwen3_vl_vision_inputs(grid, merge_size=merge, num_grid_per_side=48)
        ref = _reference(grid, merge, 48)
        for key, value in ref.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=key)


def _vision_tower(moe: bool, side: int) -> torch.nn.Module:
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": side * side,
        "deepstack_visual_indexes": [0, 1],
    }
    text = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16}
    config_cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    model_cls = transformers.Qwen3VLMoeForConditionalGeneration if moe else transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    visual = model_cls(config_cls(text_config=text, vision_config=vision)).model.visual.eval()
    with torch.no_grad():
        visual.pos_embed.weight.normal_(std=0.5)  # make a wrong interpolation visible in the output
    return visual


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("side", [4, 48])
def test_vision_forward_takes_them_instead_of_grid_thw(moe: bool, side: int) -> None:
    """Fed as kwargs with grid_thw=None, transformers' own vision tower gives the very same outputs."""
    visual = _vision_tower(moe, side)
    assert (visual.interpolation_mode, visual.interpolation_align_corners) == ("bilinear", True)
    assert visual.num_grid_per_side == side
    grid = np.array([[1, 6, 10], [2, 4, 4], [1, 2, 2]], dtype=np.int64)
    pixels = torch.randn(int(grid.prod(axis=1).sum()), 3 * 2 * 16 * 16)
    inputs = qwen3_vl_vision_inputs(grid, merge_size=2, num_grid_per_side=visual.num_grid_per_side)
    with torch.no_grad():
        ref = visual(pixels, grid_thw=torch.from_numpy(grid))
        ours = visual(pixels, grid_thw=None, **{k: torch.from_numpy(v) for k, v in inputs.items()})
    torch.testing.assert_close(ours.pooler_output, ref.pooler_output, rtol=0, atol=0)
    assert len(ours.deepstack_features) == len(ref.deepstack_features) == 2
    for a, b in zip(ours.deepstack_features, ref.deepstack_features, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_interpolation_covers_the_table_corners() -> None:
    """align_corners=True: a frame's corner patches sit exactly on the table's corners, no other patch does."""
    indices, weights = vision_interpolation(np.array([[1, 6, 10]]), 2, 48)
    # Merge-block order: the first patch is (row 0, col 0), the last (row 5, col 9).
    assert indices[0, 0] == 0 and weights[0, 0] == 1.0
    assert indices[-1, 0] == 48 * 48 - 1 and weights[-1, 0] == 1.0
    # r * 47 / 5 and c * 47 / 9 are integers only at the ends (47 is prime).
    assert (weights == 1.0).any(axis=1).sum() == 4


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        qwen3_vl_vision_inputs(np.array([[1, 3, 4]]), merge_size=2, num_grid_per_side=4)
    with pytest.raises(ValueError):
        qwen3_vl_vision_inputs(np.array([1, 4, 4]), merge_size=2, num_grid_per_side=4)
    with pytest.raises(ValueError):
        qwen3_vl_vision_inputs(np.array([[1, 4, 4]]), merge_size=2, num_grid_per_side=0)


def test_runtime_modules_do_not_import_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "import vlm_export.runtime.families.qwen3_vl.vision_inputs\n"
        "import vlm_export.runtime.families.qwen3_vl.rope_index\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
