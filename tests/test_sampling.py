"""Parity of vlm_export.runtime.sampling with transformers' own logits processors and generate()."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vlm_export.errors import InputError
from vlm_export.runtime.sampling import (
    GenerationSettings,
    StopChecker,
    TokenSelector,
    apply_finished,
    eos_reached,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

QWEN25_VL_GEN = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
}


@pytest.fixture(scope="module")
def tiny_model() -> Qwen2ForCausalLM:
    """A real (random, tiny) decoder, so transformers builds processors and runs generate() itself."""
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture
def stable_torch_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make TopPLogitsWarper sort stably, as torch does on CUDA for vocabularies > 4096 (cub radix sort).

    CPU torch.sort is an introsort above 16 elements, so the order of tied logits there is arbitrary.
    """
    original = torch.sort

    def sort(input, dim=-1, descending=False, stable=None, *, out=None):
        return original(input, dim=dim, descending=descending, stable=True)

    monkeypatch.setattr(torch, "sort", sort)


def hf_config(model, gen: dict | None, **overrides):
    """transformers' resolved GenerationConfig for generation_config.json `gen` and generate(**overrides)."""
    model.generation_config = GenerationConfig(**(gen or {}))
    cfg, _ = model._prepare_generation_config(None, **overrides)
    model._prepare_special_tokens(cfg, kwargs_has_attention_mask=True, device="cpu")
    return cfg


def hf_process(model, gen, overrides, logits, input_ids, attention_mask) -> np.ndarray:
    """Scores after the LogitsProcessorList that generate() builds (utils.py _get_logits_processor)."""
    cfg = hf_config(model, gen, **overrides)
    processors = model._get_logits_processor(
        generation_config=cfg,
        input_ids_seq_length=attention_mask.shape[1],
        model_kwargs={"attention_mask": torch.from_numpy(attention_mask)},
        device="cpu",
    )
    out = processors(torch.from_numpy(input_ids), torch.from_numpy(logits.copy()))
    return out.numpy()


def assert_same_scores(ours: np.ndarray, theirs: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=0, atol=1e-6)


def random_case(rng: np.random.Generator, batch: int, vocab: int, prompt: int, generated: int):
    """Logits with ties (a quantised band, duplicated maxima) and -inf entries; left-padded input_ids."""
    logits = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
    band = rng.random((batch, vocab)) < 0.3
    logits[band] = np.round(logits[band] * 2) / 2  # many exact ties
    logits[rng.random((batch, vocab)) < 0.05] = -np.inf
    for b in range(batch):
        top = int(np.argmax(logits[b]))
        logits[b, rng.integers(0, vocab, 2)] = logits[b, top]  # tied maxima
    lengths = rng.integers(1, prompt + 1, batch)
    lengths[0] = prompt
    mask = (np.arange(prompt)[None, :] >= (prompt - lengths)[:, None]).astype(np.int64)
    ids = rng.integers(0, vocab, (batch, prompt + generated)).astype(np.int64)
    ids[:, :prompt][mask == 0] = 0  # pad id; the penalty must skip these positions
    return logits, ids, mask


CASES = [
    pytest.param({}, {}, id="defaults-greedy"),
    pytest.param({"repetition_penalty": 1.3}, {}, id="greedy-penalty"),
    pytest.param({"repetition_penalty": 0.7, "do_sample": True}, {}, id="reward-sample-top50"),
    pytest.param(QWEN25_VL_GEN, {}, id="qwen25vl"),
    pytest.param(QWEN25_VL_GEN, {"top_k": 0, "top_p": 0.8, "temperature": 0.7}, id="qwen25vl-overrides"),
    pytest.param({"do_sample": True, "temperature": 1.7, "top_k": 7, "top_p": 0.6}, {}, id="k7-p0.6"),
    pytest.param({"do_sample": True, "top_k": 0, "top_p": 0.95}, {}, id="nucleus-only"),
    pytest.param({"do_sample": True, "top_k": 5000}, {}, id="k-above-vocab"),
    pytest.param({"do_sample": True, "top_k": 0, "min_p": 0.05, "temperature": 0.5}, {}, id="min-p"),
    pytest.param(
        {"do_sample": True, "top_k": 20, "top_p": 0.9, "min_p": 0.1, "repetition_penalty": 1.2},
        {},
        id="all",
    ),
    pytest.param(QWEN25_VL_GEN, {"do_sample": False}, id="sampling-disabled"),
]


@pytest.mark.parametrize(("gen", "overrides"), CASES)
@pytest.mark.parametrize("vocab", [1000, 152064])
def test_process_logits_matches_transformers(tiny_model, stable_torch_sort, gen, overrides, vocab):
    rng = np.random.default_rng(vocab + len(str(gen)) + len(str(overrides)))
    logits, ids, mask = random_case(rng, batch=3, vocab=vocab, prompt=12, generated=5)
    selector = TokenSelector(GenerationSettings.from_generation_config(gen, **overrides))
    ours = selector.process_logits(logits, ids, attention_mask=mask)
    theirs = hf_process(tiny_model, gen, overrides, logits, ids, mask)
    assert ours.dtype == np.float32
    assert_same_scores(ours, theirs)
    if not selector.settings.do_sample:
        np.testing.assert_array_equal(
            selector.select(logits, ids, attention_mask=mask), torch.from_numpy(theirs).argmax(-1).numpy()
        )


def test_process_logits_without_mask_penalises_padding(tiny_model):
    """Without an attention mask transformers penalises every id in input_ids, padding included."""
    rng = np.random.default_rng(1)
    logits, ids, mask = random_case(rng, batch=2, vocab=50, prompt=6, generated=2)
    gen = {"repetition_penalty": 1.5}
    ours = TokenSelector(GenerationSettings.from_generation_config(gen)).process_logits(logits, ids)
    theirs = hf_process(tiny_model, gen, {}, logits, ids, np.ones_like(mask))
    assert_same_scores(ours, theirs)


@pytest.mark.parametrize("top_p", [0.5, 0.75, 0.3, 0.999])
def test_top_p_ties_and_boundary_small_vocab(tiny_model, top_p):
    """Exact ties across the cut and cumulative mass exactly at 1 - top_p, against unpatched CPU torch.

    Up to 16 entries CPU torch.sort is stable, so this checks tie order and the `<=` boundary as is.
    """
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0], [2.0, 2.0, -np.inf, 2.0]], np.float32)
    logits = np.concatenate([logits, np.full((3, 8), -np.inf, np.float32)], axis=1)
    ids = np.zeros((3, 1), np.int64)
    gen = {"do_sample": True, "top_k": 0, "top_p": top_p}
    ours = TokenSelector(GenerationSettings.from_generation_config(gen)).process_logits(logits, ids)
    theirs = hf_process(tiny_model, gen, {}, logits, ids, np.ones_like(ids))
    assert_same_scores(ours, theirs)


def test_qwen_defaults_keep_one_token_even_with_tied_maxima(tiny_model, stable_torch_sort):
    """top_k=1 keeps both tied maxima; top_p=0.001 then keeps the one sorted last (the higher index)."""
    logits = np.full((1, 5000), -3.0, np.float32)
    logits[0, [10, 4000]] = 5.0
    ids = np.array([[1, 2, 3]], np.int64)
    selector = TokenSelector(GenerationSettings.from_generation_config(QWEN25_VL_GEN, seed=0))
    ours = selector.process_logits(logits, ids)
    theirs = hf_process(tiny_model, QWEN25_VL_GEN, {}, logits, ids, np.ones_like(ids))
    assert_same_scores(ours, theirs)
    assert np.flatnonzero(np.isfinite(ours[0])).tolist() == [4000]
    assert all(selector.select(logits, ids)[0] == 4000 for _ in range(5))


def test_greedy_is_torch_argmax_first_max():
    rng = np.random.default_rng(2)
    logits = np.round(rng.standard_normal((64, 300)), 1).astype(np.float32)  # lots of ties at the max
    logits[0] = 0.0
    logits[1, :] = -np.inf
    logits[1, 5] = logits[1, 9] = 1.0
    logits[2, 7] = np.inf
    ids = rng.integers(0, 300, (64, 4))
    selector = TokenSelector(GenerationSettings(top_k=3, temperature=0.01))  # warpers off: greedy
    got = selector.select(logits, ids)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, torch.from_numpy(logits).argmax(-1).numpy())
    assert got[0] == 0 and got[1] == 5 and got[2] == 7


def test_process_logits_leaves_inputs_alone():
    logits = np.linspace(-2, 2, 40, dtype=np.float32).reshape(2, 20)
    before = logits.copy()
    settings = GenerationSettings(do_sample=True, temperature=0.5, top_k=5, top_p=0.5, repetition_penalty=2.0)
    TokenSelector(settings).process_logits(logits, np.array([[1, 19], [3, 3]]))
    np.testing.assert_array_equal(logits, before)


def test_sampling_reproducible_and_allowed(tiny_model, stable_torch_sort):
    rng = np.random.default_rng(3)
    gen = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1}
    runs = []
    for seed in (123, 123, 124):
        selector = TokenSelector(GenerationSettings.from_generation_config(gen, seed=seed))
        runs.append([selector.select(*random_case(np.random.default_rng(s), 8, 2000, 6, 2)[:2]) for s in range(10)])
    np.testing.assert_array_equal(np.array(runs[0]), np.array(runs[1]))
    assert not np.array_equal(np.array(runs[0]), np.array(runs[2]))

    selector = TokenSelector(GenerationSettings.from_generation_config(gen, seed=7))
    for _ in range(20):
        logits, ids, mask = random_case(rng, batch=16, vocab=2000, prompt=6, generated=3)
        allowed = np.isfinite(hf_process(tiny_model, gen, {}, logits, ids, mask))
        tokens = selector.select(logits, ids, attention_mask=mask)
        assert allowed[np.arange(16), tokens].all()


def test_sampled_frequencies_follow_softmax_of_processed_scores():
    logits = np.array([[2.0, 1.5, 1.5, 0.3, -1.0, -np.inf, 0.9, -0.2]], np.float32)
    settings = GenerationSettings(do_sample=True, temperature=0.7, top_k=6, top_p=0.95, seed=11)
    selector = TokenSelector(settings)
    n = 10_000
    tiled = np.repeat(logits, n, axis=0)
    ids = np.zeros((n, 1), np.int64)
    scores = selector.process_logits(logits, ids[:1])[0]
    expected = torch.from_numpy(scores).softmax(-1).double().numpy() * n
    counts = np.bincount(selector.select(tiled, ids), minlength=logits.shape[1])
    assert (counts[expected == 0] == 0).all()
    support = expected > 0
    assert support.sum() >= 4
    chi2 = (((counts - expected) ** 2)[support] / expected[support]).sum()
    assert chi2 < 25.0, (counts, expected)  # df <= 5: p < 1e-4 beyond 25


def test_sampling_rejects_unsamplable_rows():
    selector = TokenSelector(GenerationSettings(do_sample=True, seed=0))
    with pytest.raises(RuntimeError, match="cannot sample row 1"):
        selector.select(np.array([[0.0, 1.0], [np.nan, 1.0]], np.float32), np.zeros((2, 1), np.int64))


# --------------------------------------------------------------------------------------------------------
# generate() end to end: processed scores, greedy tokens, pad replacement and stopping, step by step


def _first_private_token(a: np.ndarray, b: np.ndarray, step: int) -> int | None:
    token = int(a[step])
    return None if token in a[:step] or token in b else token


@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_parity_step_by_step(tiny_model, stable_torch_sort, do_sample):
    torch.manual_seed(0)
    prompt = torch.randint(1, 64, (2, 7))
    mask = torch.ones_like(prompt)
    prompt[1, :3], mask[1, :3] = 0, 0  # left padding
    base = {"max_new_tokens": 12, "repetition_penalty": 1.3, "pad_token_id": 0}
    if do_sample:
        base.update(do_sample=True, temperature=0.9, top_k=10, top_p=0.8)
    # Pick an eos id that row 0 emits early and row 1 never does, so row 0 finishes first.
    tiny_model.generation_config = GenerationConfig(**base)
    torch.manual_seed(1)
    dry = tiny_model.generate(input_ids=prompt, attention_mask=mask).numpy()[:, 7:]
    eos = next(t for s in range(1, 6) if (t := _first_private_token(dry[0], dry[1], s)) is not None)
    gen = {**base, "eos_token_id": [eos, 63]}
    tiny_model.generation_config = GenerationConfig(**gen)
    torch.manual_seed(1)
    out = tiny_model.generate(
        input_ids=prompt,
        attention_mask=mask,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    seq = out.sequences.numpy()

    settings = GenerationSettings.from_generation_config(gen, seed=0)
    selector, checker = TokenSelector(settings), StopChecker(settings, batch_size=2)
    for step, (raw, processed) in enumerate(zip(out.logits, out.scores, strict=True)):
        assert not checker.done
        ids = seq[:, : 7 + step]
        scores = selector.process_logits(raw.numpy(), ids, attention_mask=mask.numpy())
        assert_same_scores(scores, processed.numpy())
        chosen = seq[:, 7 + step]
        if do_sample:
            picked = selector.select(raw.numpy(), ids, attention_mask=mask.numpy())
            assert np.isfinite(scores[np.arange(2), picked]).all()
            # transformers' token (itself allowed by our scores unless the row is finished) drives the loop
            raw_pick = np.where(checker.unfinished, chosen, picked)
            assert np.isfinite(scores[np.arange(2), raw_pick]).all()
        else:
            raw_pick = selector.select(raw.numpy(), ids, attention_mask=mask.numpy())
        np.testing.assert_array_equal(checker.step(raw_pick), chosen)
    assert checker.done
    if not do_sample:
        assert checker.hit_eos[0] and not checker.hit_eos[1]
        assert (seq[0, 7:][np.argmax(seq[0, 7:] == eos) + 1 :] == 0).all()


# --------------------------------------------------------------------------------------------------------
# settings: precedence, defaults and validation


def _resolved(cfg) -> dict:
    return {
        "do_sample": cfg.do_sample,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k or None,
        "top_p": cfg.top_p,
        "min_p": cfg.min_p,
        "repetition_penalty": cfg.repetition_penalty,
        "eos_token_ids": tuple(cfg._eos_token_tensor.tolist()) if cfg._eos_token_tensor is not None else (),
        "pad_token_id": None if cfg._pad_token_tensor is None else int(cfg._pad_token_tensor),
    }


def _ours(s: GenerationSettings) -> dict:
    return {
        "do_sample": s.do_sample,
        "temperature": s.temperature,
        "top_k": s.top_k or None,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "repetition_penalty": s.repetition_penalty,
        "eos_token_ids": s.eos_token_ids,
        "pad_token_id": s.pad_token_id,
    }


PRECEDENCE = [
    pytest.param(None, {}, id="no-config"),
    pytest.param({}, {}, id="empty"),
    pytest.param({"top_k": None, "temperature": None, "eos_token_id": 5}, {}, id="nulls-and-int-eos"),
    pytest.param(QWEN25_VL_GEN, {}, id="qwen25vl"),
    pytest.param(QWEN25_VL_GEN, {"do_sample": False}, id="qwen25vl-greedy"),
    pytest.param(
        QWEN25_VL_GEN,
        {"temperature": 0.7, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.0, "eos_token_id": [9]},
        id="qwen25vl-overrides",
    ),
    pytest.param({"do_sample": True, "min_p": 0.2, "eos_token_id": [3, 4]}, {"pad_token_id": 1}, id="min-p"),
]


@pytest.mark.parametrize(("gen", "overrides"), PRECEDENCE)
def test_from_generation_config_matches_transformers(tiny_model, gen, overrides):
    ours = GenerationSettings.from_generation_config(gen, **overrides)
    assert _ours(ours) == _resolved(hf_config(tiny_model, gen, **overrides))


def test_from_generation_config_qwen25vl():
    s = GenerationSettings.from_generation_config(QWEN25_VL_GEN)
    assert s == GenerationSettings(
        max_new_tokens=20,
        do_sample=True,
        temperature=0.1,
        top_k=1,
        top_p=0.001,
        min_p=None,
        repetition_penalty=1.05,
        seed=None,
        eos_token_ids=(151645, 151643),
        pad_token_id=151643,
    )
    s = GenerationSettings.from_generation_config(
        QWEN25_VL_GEN, do_sample=False, temperature=None, top_k=None, max_new_tokens=128, seed=5
    )
    assert (s.do_sample, s.temperature, s.top_k, s.max_new_tokens, s.seed) == (False, 0.1, 1, 128, 5)
    s = GenerationSettings.from_generation_config(QWEN25_VL_GEN, eos_token_ids=[7], pad_token_id=None)
    assert (s.eos_token_ids, s.pad_token_id) == ((7,), 151643)
    s = GenerationSettings.from_generation_config({"eos_token_id": 2, "max_new_tokens": 9})
    assert (s.eos_token_ids, s.pad_token_id, s.max_new_tokens, s.top_k) == ((2,), 2, 9, 50)
    assert GenerationSettings(eos_token_ids=(4, 5)).resolved_pad_token_id == 4


def test_greedy_tolerates_sampling_values_transformers_ignores():
    """Configs often carry temperature 0 with do_sample false; transformers only warns about it."""
    s = GenerationSettings.from_generation_config({"do_sample": False, "temperature": 0.0})
    assert not s.do_sample


@pytest.mark.parametrize(
    ("gen", "overrides", "match"),
    [
        ({"do_sample": True, "temperature": 0.0}, {}, "temperature"),
        ({}, {"do_sample": True, "temperature": -1.0}, "temperature"),
        ({}, {"top_p": 0.0}, "top_p"),
        ({}, {"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, {}, "top_k"),
        ({}, {"top_k": 2.5}, "top_k"),
        ({}, {"repetition_penalty": 0.0}, "repetition_penalty"),
        ({}, {"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, {}, "max_new_tokens"),
        ({}, {"min_p": 1.5}, "min_p"),
        ({}, {"seed": -1}, "seed"),
        ({"eos_token_id": "x"}, {}, "eos_token_id"),
        ({"do_sample": "yes"}, {}, "do_sample"),
    ],
)
def test_validation_errors(gen, overrides, match):
    with pytest.raises(InputError, match=match) as info:
        GenerationSettings.from_generation_config(gen, **overrides)
    assert "\n" not in str(info.value)


def test_unknown_override_is_a_programming_error():
    with pytest.raises(TypeError, match="num_beams"):
        GenerationSettings.from_generation_config({}, num_beams=2)


def test_unsupported_config_keys_are_reported(caplog):
    with caplog.at_level("WARNING", logger="vlm_export.runtime.sampling"):
        GenerationSettings.from_generation_config({"no_repeat_ngram_size": 3, "suppress_tokens": []})
    assert "no_repeat_ngram_size" in caplog.text and "suppress_tokens" not in caplog.text


# --------------------------------------------------------------------------------------------------------
# finished rows


def test_apply_finished_and_eos():
    tokens = np.array([5, 6, 7])
    unfinished = np.array([True, False, True])
    np.testing.assert_array_equal(apply_finished(tokens, unfinished, 0), [5, 0, 7])
    np.testing.assert_array_equal(apply_finished(tokens, unfinished, None), [5, 6, 7])
    np.testing.assert_array_equal(eos_reached(tokens, (7, 6)), [False, True, True])


def test_stop_checker_mirrors_unfinished_sequences():
    settings = GenerationSettings(max_new_tokens=4, eos_token_ids=(9, 8), pad_token_id=None)
    checker = StopChecker(settings, batch_size=3)
    np.testing.assert_array_equal(checker.step(np.array([9, 1, 2])), [9, 1, 2])
    np.testing.assert_array_equal(checker.unfinished, [False, True, True])
    np.testing.assert_array_equal(checker.step(np.array([3, 8, 2])), [9, 8, 2])  # pad falls back to eos[0]
    np.testing.assert_array_equal(checker.step(np.array([3, 4, 5])), [9, 9, 5])
    assert not checker.done
    np.testing.assert_array_equal(checker.step(np.array([3, 4, 5])), [9, 9, 5])
    assert checker.done and checker.hit_eos.tolist() == [True, True, False]

    no_eos = StopChecker(GenerationSettings(max_new_tokens=2), batch_size=1)
    no_eos.step(np.array([1]))
    assert not no_eos.done
    no_eos.step(np.array([1]))
    assert no_eos.done


def test_import_loads_neither_torch_nor_transformers():
    code = (
        "import sys, vlm_export.runtime.sampling\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
