"""Host-side vision encoder inputs equal transformers.vision_utils on many grids, and stay torch-free."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vlm_export.runtime.families.qwen2_vl.vision_inputs import (
    qwen2_5_vl_vision_inputs,
    qwen2_vl_vision_inputs,
    vision_cu_seqlens,
    vision_position_ids,
    vision_window_index,
)

torch = pytest.importorskip("torch")
vision_utils = pytest.importorskip("transformers.vision_utils")


def _random_grids(rng: np.random.Generator, merge: int, count: int, max_side: int = 60) -> np.ndarray:
    t = rng.integers(1, 4, size=count)
    h = rng.integers(1, max_side // merge + 1, size=count) * merge
    w = rng.integers(1, max_side // merge + 1, size=count) * merge
    return np.stack([t, h, w], axis=1).astype(np.int64)


FIXED_GRIDS = [
    [[1, 2, 2]],
    [[1, 4, 6], [1, 8, 4]],
    [[2, 4, 4]],
    [[1, 16, 16], [3, 14, 30]],  # sides that are exact multiples of the window (full padding window)
    [[1, 60, 2], [1, 2, 60], [4, 8, 8]],
    [[1, 24, 24], [1, 36, 28], [2, 12, 18]],
]


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    cases = [np.array(g, dtype=np.int64) for g in FIXED_GRIDS]
    cases += [_random_grids(rng, 2, int(rng.integers(1, 6))) for _ in range(40)]
    return cases


CASES = _cases()


@pytest.mark.parametrize("grid", CASES, ids=lambda g: "_".join("x".join(map(str, r)) for r in g.tolist()))
def test_position_ids_and_cu_seqlens_match_transformers(grid: np.ndarray) -> None:
    tg = torch.from_numpy(grid)
    ours = vision_position_ids(grid, 2)
    ref = vision_utils.get_vision_position_ids(tg, 2).numpy()
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref)
    cu = vision_cu_seqlens(grid)
    assert cu.dtype == np.int64
    np.testing.assert_array_equal(cu, vision_utils.get_vision_cu_seqlens(tg).numpy())


@pytest.mark.parametrize("patch_size", [14, 16])
@pytest.mark.parametrize("grid", CASES, ids=lambda g: "_".join("x".join(map(str, r)) for r in g.tolist()))
def test_window_index_matches_transformers(grid: np.ndarray, patch_size: int) -> None:
    index, cu = vision_window_index(grid, 2, 112, patch_size)
    ref_index, ref_cu = vision_utils.get_vision_window_index(
        torch.from_numpy(grid), spatial_merge_size=2, window_size=112, patch_size=patch_size
    )
    assert index.dtype == np.int64 and cu.dtype == np.int64
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())


@pytest.mark.parametrize("merge", [1, 2, 3])
def test_other_merge_sizes(merge: int) -> None:
    rng = np.random.default_rng(merge)
    for _ in range(10):
        grid = _random_grids(rng, merge, int(rng.integers(1, 5)))
        tg = torch.from_numpy(grid)
        np.testing.assert_array_equal(
            vision_position_ids(grid, merge), vision_utils.get_vision_position_ids(tg, merge).numpy()
        )
        index, cu = vision_window_index(grid, merge, 112, 14)
        ref_index, ref_cu = vision_utils.get_vision_window_index(
            tg, spatial_merge_size=merge, window_size=112, patch_size=14
        )
        np.testing.assert_array_equal(index, ref_index.numpy())
        np.testing.assert_array_equal(cu, ref_cu.numpy())


def test_bundles() -> None:
    grid = np.array([[1, 4, 6], [2, 8, 4]])
    inputs = qwen2_5_vl_vision_inputs(grid, merge_size=2, window_size=112, patch_size=14)
    assert set(inputs) == {"position_ids", "cu_seqlens", "window_index", "cu_window_seqlens"}
    assert all(v.dtype == np.int64 for v in inputs.values())
    n = int(np.prod(grid, axis=1).sum())
    assert inputs["position_ids"].shape == (n, 2)
    assert inputs["window_index"].shape == (n // 4,)
    assert inputs["cu_seqlens"][-1] == inputs["cu_window_seqlens"][-1] == n
    assert set(qwen2_vl_vision_inputs(grid, merge_size=2)) == {"position_ids", "cu_seqlens"}


def test_rejects_bad_grids() -> None:
    with pytest.raises(ValueError):
        vision_position_ids(np.array([[1, 3, 4]]), 2)
    with pytest.raises(ValueError):
        vision_cu_seqlens(np.array([1, 4, 4]))
    with pytest.raises(ValueError):
        vision_window_index(np.array([[1, 4, 4]]), 2, 16, 14)


def test_runtime_modules_do_not_import_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "import vlm_export.runtime.families.qwen2_vl.vision_inputs\n"
        "import vlm_export.runtime.families.qwen2_vl.rope_index\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
