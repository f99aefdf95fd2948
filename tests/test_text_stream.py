"""Streamed text (`runtime/text_stream.py`): whole characters only, deltas that add up to `decode`, stop strings
never leaked, per-token release counts; and raw-distribution logprobs (`sampling.token_logprobs`)."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_export.errors import InputError
from vlm_export.runtime.sampling import token_logprobs
from vlm_export.runtime.text_stream import IncrementalText, SequenceText, StopStrings
from vlm_export.runtime.tokenizer import TextTokenizer

TEXT = "Grüße aus Köln 🎉 — 東京 and 😀😀 end"


@pytest.fixture(scope="module")
def tokenizer(qwen2_tokenizer_dir) -> TextTokenizer:
    return TextTokenizer(qwen2_tokenizer_dir / "tokenizer.json")


def test_deltas_are_whole_characters_and_add_up_to_decode(tokenizer):
    ids = tokenizer.encode(TEXT)
    stream = IncrementalText(tokenizer)
    deltas = [stream.push(i) for i in ids]
    assert "" in deltas, "some token holds part of a character (the emoji): it must be held back"
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + stream.finish() == tokenizer.decode(ids) == TEXT


def test_an_unfinished_character_comes_out_at_the_end_as_decode_shows_it(tokenizer):
    ids = tokenizer.encode("ok 🎉")
    cut = ids[:-1]
    stream = IncrementalText(tokenizer)
    text = "".join(stream.push(i) for i in cut)
    assert text + stream.finish() == tokenizer.decode(cut)
    assert tokenizer.decode(cut).endswith("\ufffd")


def test_token_bytes_rebuild_the_utf8(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == TEXT.encode("utf-8")


def _feed(stops: StopStrings, text: str) -> list[str]:
    return [stops.push(ch) for ch in text]


def test_stop_string_prefix_is_held_until_decided():
    stops = StopStrings(["STOP", "\n\n"])
    out = _feed(stops, "Hello ST")
    assert "".join(out) == "Hello "  # "ST" may become "STOP"
    out += _feed(stops, "ART and STO")
    assert "".join(out) == "Hello START and " and not stops.stopped
    out += _feed(stops, "P! more")
    assert "".join(out) == "Hello START and " and stops.stopped
    assert stops.push("x") == "" and stops.finish() == ""


def test_no_stop_releases_everything_at_finish():
    stops = StopStrings(["abc"])
    released = "".join(_feed(stops, "xxab")) + stops.finish()
    assert released == "xxab" and not stops.stopped


def test_earliest_stop_wins_and_empty_stop_is_refused():
    stops = StopStrings(["world", "lo w"])
    assert stops.push("hello world") == "hel"
    with pytest.raises(InputError):
        StopStrings([""])


def test_sequence_text_counts_released_tokens(tokenizer):
    ids = tokenizer.encode(TEXT)
    seq = SequenceText(tokenizer)
    deltas = [seq.push(i) for i in ids] + [seq.finish()]
    assert sum(d.tokens for d in deltas) == len(ids)
    assert "".join(d.text for d in deltas) == TEXT

    ids = tokenizer.encode("one two three four")
    seq = SequenceText(tokenizer, stops=["three"])
    deltas = []
    for i in ids:
        deltas.append(seq.push(i))
        if deltas[-1].stopped:
            break
    assert deltas[-1].stopped and seq.text == "one two "
    released = sum(d.tokens for d in deltas)
    assert tokenizer.decode(ids[:released]) == "one two"  # " three" began in the next token


def test_token_logprobs_are_log_softmax_of_the_raw_logits():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    logits[1, [4, 9]] = 5.0  # a tie: lower id first
    chosen, top_ids, top = token_logprobs(logits, np.array([0, 9, 49]), top_n=4)
    reference = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(chosen, reference[[0, 1, 2], [0, 9, 49]], rtol=1e-6)
    np.testing.assert_array_equal(top_ids, np.argsort(-reference, axis=-1, kind="stable")[:, :4])
    np.testing.assert_allclose(top, np.take_along_axis(reference, top_ids, -1), rtol=1e-6)
    assert top_ids[1, :2].tolist() == [4, 9]
    assert token_logprobs(logits, np.array([0, 0, 0]))[1].shape == (3, 0)
