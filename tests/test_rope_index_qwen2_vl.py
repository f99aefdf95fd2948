"""Host-side M-RoPE positions equal transformers 5.24: get_rope_index, and what generate() feeds.

The truth for prefill/decode is captured from a tiny random Qwen2.5-VL: a forward pre-hook on the
language model records the ``position_ids`` it receives at every step of ``generate()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pytest

from vlm_export.runtime.families.qwen2_vl.rope_index import (
    decode_position_ids,
    get_rope_index,
    prefill_position_ids,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAD, IMAGE, VIDEO, V_START, V_END = 0, 250, 251, 252, 253
MERGE = 2
PATCH_DIM = 3 * 2 * 14 * 14
NEW_TOKENS = 4


@cache
def _model(tokens_per_second: int) -> transformers.Qwen2_5_VLForConditionalGeneration:
    cfg = transformers.Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 256,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": PAD,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [0],
            "tokens_per_second": tokens_per_second,
        },
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
    )
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()


@dataclass
class Batch:
    """A left-padded batch built from segment specs, with its grids in placeholder order."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    image_grids: list[list[int]] = field(default_factory=list)
    video_grids: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def kwargs(self, tokens_per_second: float) -> dict:
        return {
            "image_token_id": IMAGE,
            "video_token_id": VIDEO,
            "image_grid_thw": np.array(self.image_grids, dtype=np.int64) if self.image_grids else None,
            "video_grid_thw": np.array(self.video_grids, dtype=np.int64) if self.video_grids else None,
            "second_per_grid_ts": self.seconds or None,
            "spatial_merge_size": MERGE,
            "tokens_per_second": tokens_per_second,
        }


def _build(rows: list[list[tuple]], seed: int = 0, pad_side: str = "left") -> Batch:
    """rows: per sequence, segments ("text", n) | ("image", t, h, w) | ("video", t, h, w, seconds)."""
    rng = np.random.default_rng(seed)
    seqs: list[list[int]] = []
    batch = Batch(np.zeros(0), np.zeros(0))
    for row in rows:
        ids: list[int] = []
        for seg in row:
            if seg[0] == "text":
                ids += rng.integers(3, 240, size=seg[1]).tolist()
                continue
            t, h, w = seg[1:4]
            n = t * h * w // MERGE**2
            ids += [V_START] + [IMAGE if seg[0] == "image" else VIDEO] * n + [V_END]
            if seg[0] == "image":
                batch.image_grids.append([t, h, w])
            else:
                batch.video_grids.append([t, h, w])
                batch.seconds.append(seg[4])
        seqs.append(ids)
    length = max(map(len, seqs))
    batch.input_ids = np.full((len(seqs), length), PAD, dtype=np.int64)
    batch.attention_mask = np.zeros((len(seqs), length), dtype=np.int64)
    for b, ids in enumerate(seqs):
        cols = slice(length - len(ids), length) if pad_side == "left" else slice(0, len(ids))
        batch.input_ids[b, cols] = ids
        batch.attention_mask[b, cols] = 1
    return batch


def _torch_kwargs(batch: Batch) -> dict:
    """What the HF processor would hand to the model (second_per_grid_ts as a float32 tensor)."""
    ids = torch.from_numpy(batch.input_ids)
    kw = {
        "input_ids": ids,
        "attention_mask": torch.from_numpy(batch.attention_mask),
        "mm_token_type_ids": (ids == IMAGE).long() + 2 * (ids == VIDEO).long(),
    }
    if batch.image_grids:
        kw["image_grid_thw"] = torch.tensor(batch.image_grids)
    if batch.video_grids:
        kw["video_grid_thw"] = torch.tensor(batch.video_grids)
        kw["second_per_grid_ts"] = torch.tensor(batch.seconds)
    return kw


def _reference_rope_index(batch: Batch, tps: int, with_mask: bool = True) -> tuple[np.ndarray, np.ndarray]:
    kw = _torch_kwargs(batch)
    if not with_mask:
        kw["attention_mask"] = None
    pos, deltas = _model(tps).model.get_rope_index(**kw)
    return pos.numpy(), deltas.numpy()


def _generate_positions(batch: Batch, tps: int) -> list[np.ndarray]:
    """position_ids reaching the language model at prefill and each decode step of generate()."""
    model = _model(tps)
    captured: list[np.ndarray] = []

    def hook(_module, _args, kwargs):
        captured.append(kwargs["position_ids"].numpy().copy())

    kw = _torch_kwargs(batch)
    if batch.image_grids:
        n = int(np.prod(batch.image_grids, axis=1).sum())
        kw["pixel_values"] = torch.randn(n, PATCH_DIM)
    if batch.video_grids:
        n = int(np.prod(batch.video_grids, axis=1).sum())
        kw["pixel_values_videos"] = torch.randn(n, PATCH_DIM)
    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**kw, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    finally:
        handle.remove()
    assert len(captured) == NEW_TOKENS
    return captured


GENERATE_CASES = {
    "text_only": ([[("text", 9)]], 4),
    "text_only_padded": ([[("text", 9)], [("text", 4)], [("text", 6)]], 4),
    "one_image": ([[("text", 3), ("image", 1, 4, 6), ("text", 5)]], 4),
    "two_images": ([[("text", 2), ("image", 1, 4, 6), ("text", 3), ("image", 1, 8, 4), ("text", 4)]], 4),
    "padded_batch_images_and_none": (
        [[("text", 2), ("image", 1, 4, 6), ("text", 1), ("image", 1, 8, 4), ("text", 3)], [("text", 7)]],
        4,
    ),
    "video": ([[("text", 3), ("video", 2, 4, 4, 1.0), ("text", 6)]], 4),
    # tokens_per_second * seconds spreads the video's temporal axis past the text that follows it.
    "video_overshoot": ([[("text", 2), ("video", 3, 4, 4, 2.0), ("text", 2)]], 4),
    "video_fractional_seconds": ([[("text", 2), ("video", 4, 4, 6, 2 / 3), ("text", 3)]], 2),
    # float32 like torch: 15 * float32(25 * 2/3) truncates to 250, float64 would give 249.
    "video_float32_interval": ([[("text", 2), ("video", 16, 2, 2, 2 / 3), ("text", 2)]], 25),
    "image_and_video": (
        [[("text", 2), ("image", 1, 8, 4), ("text", 2), ("video", 2, 4, 4, 1.0), ("text", 3)]],
        2,
    ),
    "padded_batch_mixed": (
        [
            [("text", 2), ("video", 2, 4, 4, 0.5), ("text", 2), ("image", 1, 4, 6), ("text", 2)],
            [("text", 3), ("image", 1, 8, 8), ("text", 1)],
            [("text", 3)],
        ],
        2,
    ),
}


@pytest.mark.parametrize("name", list(GENERATE_CASES))
def test_matches_generate_prefill_and_decode(name: str) -> None:
    rows, tps = GENERATE_CASES[name]
    batch = _build(rows, seed=len(name))
    steps = _generate_positions(batch, tps)

    prefill, deltas = prefill_position_ids(batch.input_ids, batch.attention_mask, **batch.kwargs(tps))
    assert prefill.dtype == np.int64 and deltas.dtype == np.int64
    assert deltas.shape == (len(rows), 1)
    # generate feeds [4, B, S]: a text-only row (cumsum of the mask, pads 0) then the 3 M-RoPE rows.
    assert steps[0].shape == (4, *batch.input_ids.shape)
    text_row = np.where(batch.attention_mask == 1, np.cumsum(batch.attention_mask, axis=1) - 1, 0)
    np.testing.assert_array_equal(steps[0][0], text_row)
    np.testing.assert_array_equal(prefill, steps[0][1:])

    mask = batch.attention_mask
    for step in steps[1:]:
        mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
        ours = decode_position_ids(mask, deltas)
        assert ours.dtype == np.int64 and ours.shape == (3, len(rows), 1)
        np.testing.assert_array_equal(ours, step[1:])


def test_decode_several_new_tokens_at_once() -> None:
    batch = _build(GENERATE_CASES["padded_batch_mixed"][0], seed=3)
    steps = _generate_positions(batch, 2)
    _, deltas = prefill_position_ids(batch.input_ids, batch.attention_mask, **batch.kwargs(2))
    mask = np.concatenate([batch.attention_mask, np.ones((3, NEW_TOKENS - 1), dtype=np.int64)], axis=1)
    expected = np.concatenate([s[1:] for s in steps[1:]], axis=-1)
    np.testing.assert_array_equal(decode_position_ids(mask, deltas, num_new=NEW_TOKENS - 1), expected)


def test_generate_deltas_differ_from_get_rope_index_when_video_overshoots() -> None:
    """transformers quirk: generate decodes from the last prompt position, not from max + 1."""
    batch = _build(GENERATE_CASES["video_overshoot"][0])
    _, ref_deltas = _reference_rope_index(batch, 4)
    _, deltas = prefill_position_ids(batch.input_ids, batch.attention_mask, **batch.kwargs(4))
    assert (ref_deltas > deltas).all()


@pytest.mark.parametrize("name", list(GENERATE_CASES))
def test_get_rope_index_matches_transformers_on_generate_cases(name: str) -> None:
    rows, tps = GENERATE_CASES[name]
    batch = _build(rows, seed=len(name))
    pos, deltas = get_rope_index(batch.input_ids, batch.attention_mask, **batch.kwargs(tps))
    ref_pos, ref_deltas = _reference_rope_index(batch, tps)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)


def _random_rows(rng: np.random.Generator, batch_size: int) -> list[list[tuple]]:
    rows = []
    for _ in range(batch_size):
        row: list[tuple] = [("text", int(rng.integers(1, 5)))]
        for _ in range(int(rng.integers(0, 4))):
            h, w = (int(v) * MERGE for v in rng.integers(1, 9, size=2))
            if rng.random() < 0.5:
                row.append(("image", 1, h, w))
            else:
                seconds = float(rng.choice([0.5, 1.0, 2 / 3, 2 / 2.5, 2 / 29.97, 2.0]))
                row.append(("video", int(rng.integers(1, 6)), h, w, seconds))
            row.append(("text", int(rng.integers(1, 6))))
        rows.append(row)
    return rows


@pytest.mark.parametrize("tps", [2, 4, 25])
@pytest.mark.parametrize("seed", range(8))
def test_get_rope_index_random_batches(seed: int, tps: int) -> None:
    rng = np.random.default_rng(seed)
    batch = _build(_random_rows(rng, int(rng.integers(1, 5))), seed=seed, pad_side=["left", "right"][seed % 2])
    pos, deltas = get_rope_index(batch.input_ids, batch.attention_mask, **batch.kwargs(tps))
    ref_pos, ref_deltas = _reference_rope_index(batch, tps)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)
    if seed % 2 == 0:  # without a mask every token counts, pads included
        pos, deltas = get_rope_index(batch.input_ids, None, **batch.kwargs(tps))
        ref_pos, ref_deltas = _reference_rope_index(batch, tps, with_mask=False)
        np.testing.assert_array_equal(pos, ref_pos)
        np.testing.assert_array_equal(deltas, ref_deltas)


def test_qwen2_vl_has_no_temporal_scaling() -> None:
    """Qwen2-VL's get_rope_index equals ours with tokens_per_second=1 and no seconds."""
    cfg = transformers.Qwen2VLConfig(
        text_config={
            "vocab_size": 256,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2},
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
    )
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    rng = np.random.default_rng(7)
    for _ in range(4):
        batch = _build(_random_rows(rng, 3), seed=1)
        kw = _torch_kwargs(batch)
        kw.pop("second_per_grid_ts", None)
        ref_pos, ref_deltas = model.model.get_rope_index(**kw)
        kwargs = batch.kwargs(1) | {"second_per_grid_ts": None}
        pos, deltas = get_rope_index(batch.input_ids, batch.attention_mask, **kwargs)
        np.testing.assert_array_equal(pos, ref_pos.numpy())
        np.testing.assert_array_equal(deltas, ref_deltas.numpy())


def test_prefill_refuses_prompt_ending_in_vision_tokens() -> None:
    batch = _build([[("text", 3), ("image", 1, 4, 6)]])
    ids, mask = batch.input_ids[:, :-1], batch.attention_mask[:, :-1]  # drop <|vision_end|>
    with pytest.raises(ValueError, match="end in a vision token"):
        prefill_position_ids(ids, mask, **batch.kwargs(4))


def test_grid_token_count_mismatch_is_an_error() -> None:
    batch = _build([[("text", 3), ("image", 1, 4, 6), ("text", 2)]])
    kwargs = batch.kwargs(4) | {"image_grid_thw": np.array([[1, 4, 8]])}
    with pytest.raises(ValueError, match="does not match grid"):
        get_rope_index(batch.input_ids, batch.attention_mask, **kwargs)
    with pytest.raises(ValueError, match="more image token runs"):
        get_rope_index(batch.input_ids, batch.attention_mask, **(batch.kwargs(4) | {"image_grid_thw": None}))
