"""Host-side Qwen3-VL M-RoPE positions equal transformers 5.24: get_rope_index, and what generate() feeds.

Truth for prefill/decode is captured from a tiny random Qwen3-VL (and Qwen3-VL-MoE): a forward pre-hook on
the language model records the ``position_ids`` it receives at every step of ``generate()``. Videos are laid
out as the Qwen3-VL processor does: per frame ``<{t:.1f} seconds><|vision_start|>frame<|vision_end|>``
(timestamp text as a few synthetic tokens), inside the chat template's outer vision_start/vision_end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pytest

from vlm_export.runtime.families.qwen3_vl.rope_index import (
    decode_position_ids,
    get_rope_index,
    prefill_position_ids,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAD, IMAGE, VIDEO, V_START, V_END = 0, 250, 251, 252, 253
MERGE = 2
PATCH_DIM = 3 * 2 * 16 * 16
NEW_TOKENS = 4
TIMESTAMP_TOKENS = 3  # "<0.5 seconds>" is a few text tokens; their count does not matter, their presence does

_TEXT = {
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": PAD,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
    },
}
_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 32,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": MERGE,
    "num_position_embeddings": 16,
    "deepstack_visual_indexes": [1],
}
_TOP = {
    "image_token_id": IMAGE,
    "video_token_id": VIDEO,
    "vision_start_token_id": V_START,
    "vision_end_token_id": V_END,
}


@cache
def _model(moe: bool = False) -> torch.nn.Module:
    if moe:
        text = _TEXT | {"moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2}
        cfg = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=_VISION, **_TOP)
        cls = transformers.Qwen3VLMoeForConditionalGeneration
    else:
        cfg = transformers.Qwen3VLConfig(text_config=_TEXT, vision_config=_VISION, **_TOP)
        cls = transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    return cls(cfg).eval()


@dataclass
class Batch:
    """A padded batch built from segment specs, with its grids in placeholder order."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    image_grids: list[list[int]] = field(default_factory=list)
    video_grids: list[list[int]] = field(default_factory=list)

    def kwargs(self) -> dict:
        return {
            "image_token_id": IMAGE,
            "video_token_id": VIDEO,
            "image_grid_thw": np.array(self.image_grids, dtype=np.int64) if self.image_grids else None,
            "video_grid_thw": np.array(self.video_grids, dtype=np.int64) if self.video_grids else None,
            "spatial_merge_size": MERGE,
        }


def _build(rows: list[list[tuple]], seed: int = 0, pad_side: str = "left") -> Batch:
    """rows: per sequence, segments ("text", n) | ("image", t, h, w) | ("video", t, h, w)."""
    rng = np.random.default_rng(seed)

    def text(n: int) -> list[int]:
        return rng.integers(3, 240, size=n).tolist()

    seqs: list[list[int]] = []
    batch = Batch(np.zeros(0), np.zeros(0))
    for row in rows:
        ids: list[int] = []
        for seg in row:
            if seg[0] == "text":
                ids += text(seg[1])
                continue
            t, h, w = seg[1:4]
            if seg[0] == "image":
                ids += [V_START] + [IMAGE] * (t * h * w // MERGE**2) + [V_END]
                batch.image_grids.append([t, h, w])
            else:  # processor: one timestamp + vision_start/end per frame, inside the template's pair
                ids.append(V_START)
                for _ in range(t):
                    ids += text(TIMESTAMP_TOKENS) + [V_START] + [VIDEO] * (h * w // MERGE**2) + [V_END]
                ids.append(V_END)
                batch.video_grids.append([t, h, w])
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
    """What the HF processor would hand to the model, ``mm_token_type_ids`` included (5.24 needs it)."""
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
    return kw


def _reference_rope_index(batch: Batch, with_mask: bool = True, moe: bool = False) -> tuple[np.ndarray, np.ndarray]:
    kw = _torch_kwargs(batch)
    if not with_mask:
        kw["attention_mask"] = None
    pos, deltas = _model(moe).model.get_rope_index(**kw)
    return pos.numpy(), deltas.numpy()


def _generate_positions(batch: Batch, moe: bool = False) -> list[np.ndarray]:
    """position_ids reaching the language model at prefill and each decode step of generate()."""
    model = _model(moe)
    captured: list[np.ndarray] = []

    def hook(_module, _args, kwargs):
        captured.append(kwargs["position_ids"].numpy().copy())

    kw = _torch_kwargs(batch)
    if batch.image_grids:
        kw["pixel_values"] = torch.randn(int(np.prod(batch.image_grids, axis=1).sum()), PATCH_DIM)
    if batch.video_grids:
        kw["pixel_values_videos"] = torch.randn(int(np.prod(batch.video_grids, axis=1).sum()), PATCH_DIM)
    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**kw, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    finally:
        handle.remove()
    assert len(captured) == NEW_TOKENS
    return captured


GENERATE_CASES = {
    "text_only": [[("text", 9)]],
    "text_only_padded": [[("text", 9)], [("text", 4)], [("text", 6)]],
    "one_image": [[("text", 3), ("image", 1, 4, 6), ("text", 5)]],
    "two_images": [[("text", 2), ("image", 1, 4, 6), ("text", 3), ("image", 1, 8, 4), ("text", 4)]],
    "padded_batch_images_and_none": [
        [("text", 2), ("image", 1, 4, 6), ("text", 1), ("image", 1, 8, 4), ("text", 3)],
        [("text", 7)],
    ],
    "video_t2": [[("text", 3), ("video", 2, 4, 4), ("text", 6)]],
    "video_t3_wide": [[("text", 2), ("video", 3, 2, 8), ("text", 2)]],
    "image_and_video": [[("text", 2), ("image", 1, 8, 4), ("text", 2), ("video", 2, 4, 6), ("text", 3)]],
    "padded_batch_mixed": [
        [("text", 2), ("video", 2, 4, 4), ("text", 2), ("image", 1, 4, 6), ("text", 2)],
        [("text", 3), ("image", 1, 8, 8), ("text", 1)],
        [("text", 3)],
    ],
}


def _check_generate(batch: Batch, steps: list[np.ndarray]) -> None:
    rows = len(batch.input_ids)
    prefill, deltas = prefill_position_ids(batch.input_ids, batch.attention_mask, **batch.kwargs())
    assert prefill.dtype == np.int64 and deltas.dtype == np.int64
    assert deltas.shape == (rows, 1)
    # generate feeds [4, B, S]: a text-only row (cumsum of the mask, pads 0) then the 3 M-RoPE rows.
    assert steps[0].shape == (4, *batch.input_ids.shape)
    text_row = np.where(batch.attention_mask == 1, np.cumsum(batch.attention_mask, axis=1) - 1, 0)
    np.testing.assert_array_equal(steps[0][0], text_row)
    np.testing.assert_array_equal(prefill, steps[0][1:])

    mask = batch.attention_mask
    for step in steps[1:]:
        mask = np.concatenate([mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
        ours = decode_position_ids(mask, deltas)
        assert ours.dtype == np.int64 and ours.shape == (3, rows, 1)
        np.testing.assert_array_equal(ours, step[1:])


@pytest.mark.parametrize("name", list(GENERATE_CASES))
def test_matches_generate_prefill_and_decode(name: str) -> None:
    batch = _build(GENERATE_CASES[name], seed=len(name))
    _check_generate(batch, _generate_positions(batch))


@pytest.mark.parametrize("name", ["padded_batch_mixed", "video_t2", "text_only_padded"])
def test_moe_matches_generate_prefill_and_decode(name: str) -> None:
    """Qwen3-VL-MoE's get_rope_index / generate positions are a copy of the dense model's."""
    batch = _build(GENERATE_CASES[name], seed=len(name))
    _check_generate(batch, _generate_positions(batch, moe=True))


def test_decode_several_new_tokens_at_once() -> None:
    batch = _build(GENERATE_CASES["padded_batch_mixed"], seed=3)
    steps = _generate_positions(batch)
    _, deltas = prefill_position_ids(batch.input_ids, batch.attention_mask, **batch.kwargs())
    mask = np.concatenate([batch.attention_mask, np.ones((3, NEW_TOKENS - 1), dtype=np.int64)], axis=1)
    expected = np.concatenate([s[1:] for s in steps[1:]], axis=-1)
    np.testing.assert_array_equal(decode_position_ids(mask, deltas, num_new=NEW_TOKENS - 1), expected)


@pytest.mark.parametrize("name", list(GENERATE_CASES))
def test_get_rope_index_matches_transformers_on_generate_cases(name: str) -> None:
    batch = _build(GENERATE_CASES[name], seed=len(name))
    pos, deltas = get_rope_index(batch.input_ids, batch.attention_mask, **batch.kwargs())
    ref_pos, ref_deltas = _reference_rope_index(batch)
    assert pos.dtype == np.int64 and deltas.dtype == np.int64
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)
    # For processor-shaped prompts (images t = 1, ending in text) generate's deltas are get_rope_index's.
    _, prefill_deltas = prefill_position_ids(batch.input_ids, batch.attention_mask, **batch.kwargs())
    np.testing.assert_array_equal(prefill_deltas, ref_deltas)


def _random_rows(rng: np.random.Generator, batch_size: int) -> list[list[tuple]]:
    rows = []
    for _ in range(batch_size):
        row: list[tuple] = [("text", int(rng.integers(1, 5)))]
        for _ in range(int(rng.integers(0, 4))):
            h, w = (int(v) * MERGE for v in rng.integers(1, 9, size=2))
            kind = "image" if rng.random() < 0.5 else "video"
            # Images with t > 1 do not come from the processor, but get_rope_index must still agree.
            t = int(rng.integers(1, 6)) if kind == "video" or rng.random() < 0.2 else 1
            row.append((kind, t, h, w))
            row.append(("text", int(rng.integers(1, 6))))
        rows.append(row)
    return rows


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("seed", range(10))
def test_get_rope_index_random_batches(seed: int, moe: bool) -> None:
    rng = np.random.default_rng(seed)
    batch = _build(_random_rows(rng, int(rng.integers(1, 5))), seed=seed, pad_side=["left", "right"][seed % 2])
    pos, deltas = get_rope_index(batch.input_ids, batch.attention_mask, **batch.kwargs())
    ref_pos, ref_deltas = _reference_rope_index(batch, moe=moe)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)
    if seed % 2 == 0:  # without a mask every token counts, pads included
        pos, deltas = get_rope_index(batch.input_ids, None, **batch.kwargs())
        ref_pos, ref_deltas = _reference_rope_index(batch, with_mask=False, moe=moe)
        np.testing.assert_array_equal(pos, ref_pos)
        np.testing.assert_array_equal(deltas, ref_deltas)


def test_image_with_frames_overshooting_text_decodes_like_generate() -> None:
    """transformers quirk: an image grid's t does not advance the position, so t=4 on a 1x1-merged image
    puts its frame axis past the text after it; generate decodes from the last prompt position anyway."""
    batch = _build([[("text", 2), ("image", 4, 2, 2), ("text", 1)]])
    _, ref_deltas = _reference_rope_index(batch)
    _, deltas = prefill_position_ids(batch.input_ids, batch.attention_mask, **batch.kwargs())
    assert (ref_deltas > deltas).all()
    _check_generate(batch, _generate_positions(batch))


def test_prefill_refuses_prompt_ending_in_vision_tokens() -> None:
    batch = _build([[("text", 3), ("image", 1, 4, 6)]])
    ids, mask = batch.input_ids[:, :-1], batch.attention_mask[:, :-1]  # drop <|vision_end|>
    with pytest.raises(ValueError, match="end in a vision token"):
        prefill_position_ids(ids, mask, **batch.kwargs())


def test_grid_token_count_mismatch_is_an_error() -> None:
    batch = _build([[("text", 3), ("image", 1, 4, 6), ("text", 2)]])
    with pytest.raises(ValueError, match="does not match grid"):
        get_rope_index(batch.input_ids, batch.attention_mask, **(batch.kwargs() | {"image_grid_thw": [[1, 4, 8]]}))
    with pytest.raises(ValueError, match="more image token runs"):
        get_rope_index(batch.input_ids, batch.attention_mask, **(batch.kwargs() | {"image_grid_thw": None}))


def test_video_frames_must_be_separated_by_text() -> None:
    """Without the timestamp text, two frames form one run of video tokens and cannot match a frame grid."""
    ids = np.array([[5, 6, V_START] + [VIDEO] * 8 + [V_END, 7]])
    with pytest.raises(ValueError, match="video frame run of 8 tokens"):
        get_rope_index(
            ids,
            None,
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            image_grid_thw=None,
            video_grid_thw=np.array([[2, 4, 4]]),
            spatial_merge_size=MERGE,
        )
