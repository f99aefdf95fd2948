"""Ragged segment attention (graphs/attention.py + runtime/segments.py) equals per-segment attention."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vlm_export.runtime.segments import segment_layout

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("lengths", [[5], [3, 7, 1], [4, 4, 4, 4], [1, 0, 6]])
def test_layout_round_trips(lengths):
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    index, position = segment_layout(cu)
    total = int(cu[-1])
    assert index.shape == (sum(1 for n in lengths if n), max(lengths))
    flat = index.reshape(-1)
    # every row appears exactly once, padding points at the extra row N
    assert sorted(flat[flat < total].tolist()) == list(range(total))
    assert np.all(flat[position] == np.arange(total))


@pytest.mark.parametrize("lengths", [[5], [3, 7, 1], [16, 2]])
def test_segment_attention_equals_loop(lengths):
    from vlm_export.graphs.attention import segment_attention

    generator = torch.Generator().manual_seed(0)
    total, heads, dim = sum(lengths), 2, 8
    q, k, v = (torch.randn(total, heads, dim, generator=generator) for _ in range(3))
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    index, position = segment_layout(cu)
    packed = (t.flatten(1) for t in (q, k, v))  # [N, heads * head_dim], as the vision blocks call it
    got = segment_attention(*packed, torch.from_numpy(index), torch.from_numpy(position), dim**-0.5, heads)
    got = got.unflatten(1, (heads, dim))
    expected = []
    for start, end in itertools.pairwise(cu):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        expected.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
    assert torch.allclose(got, torch.cat(expected), atol=1e-6)
