"""Next-token selection in numpy, mirroring transformers 5.24 ``generate()`` for greedy and sampling.

The exported decoder only yields logits; picking the token is host code. To reproduce what
``model.generate()`` would pick, this module mirrors (see ``transformers/generation/``):

* ``utils.py`` ``_get_logits_processor`` (order of the processors), ``_prepare_generation_config``
  (precedence: ``generate`` kwargs > ``generation_config.json`` > global defaults),
  ``_prepare_special_tokens`` (``pad_token_id`` falls back to the first eos id) and ``_sample`` (softmax +
  multinomial or argmax, pad for finished rows, stopping criteria);
* ``logits_process.py`` ``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``,
  ``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``;
* ``stopping_criteria.py`` ``EosTokenCriteria`` and ``MaxLengthCriteria``.

Arithmetic stays in float32 where transformers computes in float32 (scalars are rounded to float32 first,
as torch does), so repetition penalty, temperature and top-k are bit-identical. Top-p and min-p compare a
softmax against a threshold; torch's float32 softmax is not bit-reproducible, so a token whose cumulative
probability lies within ~1e-6 of the threshold may fall on the other side. Ties inside top-p follow a
stable sort (lower index first), which is what torch does on CUDA for vocabularies over 4096 (cub radix
sort) and on CPU for up to 16 entries; CPU ``torch.sort`` of longer rows orders ties arbitrarily.

Sampling draws from numpy's PCG64, not torch's generator: the same seed gives reproducible tokens, not
torch's tokens. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlm_export.errors import InputError

logger = logging.getLogger(__name__)

# Temperature and repetition penalty divide float32 logits: outside this range the result overflows (a 1e-40
# temperature is a float32 denormal: every logit becomes inf) or rounds the divisor to inf (NaN scores).
_MIN_SCALE, _MAX_SCALE = 1e-30, 1e30

# transformers 5.24 GenerationConfig._get_default_generation_params (configuration_utils.py), subset.
_DEFAULT_TOP_K = 50
_DEFAULT_MAX_NEW_TOKENS = 20

# generation_config.json keys that change transformers' greedy/sample output but that this runtime does not
# implement, with the value at which they are inert. Seen with another value, they are reported (not fatal:
# the model's own config must stay loadable).
_UNSUPPORTED_KEYS: dict[str, Any] = {
    "min_length": 0,
    "min_new_tokens": None,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "num_beams": 1,
    "penalty_alpha": None,
    "guidance_scale": None,
    "exponential_decay_length_penalty": None,
    "remove_invalid_values": False,
    "stop_strings": None,
    "watermarking_config": None,
    "dola_layers": None,
}

_OVERRIDE_NAMES = frozenset(
    {
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "seed",
        "eos_token_ids",
        "eos_token_id",
        "pad_token_id",
    }
)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InputError(f"generation setting {name} must be an integer, got {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"generation setting {name} must be a number, got {value!r}")
    return float(value)


def _as_token_ids(name: str, value: Any) -> tuple[int, ...]:
    """eos_token_id may be one int or a list, as in generation_config.json and generate(eos_token_id=...)."""
    if value is None:
        return ()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),)
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_as_int(name, v) for v in value)
    raise InputError(f"generation setting {name} must be an int or a list of ints, got {value!r}")


@dataclass(frozen=True)
class GenerationSettings:
    """What ``generate()`` would use for greedy/sample decoding; validated on construction.

    ``top_k`` of None or 0 disables top-k (transformers skips ``TopKLogitsWarper`` for 0 and None).
    Warpers (temperature, top-k, top-p, min-p) only act when ``do_sample`` is true, as in transformers.
    """

    max_new_tokens: int = _DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = _DEFAULT_TOP_K
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        # Normalise types (JSON gives ints for floats and lists for tuples), then check ranges.
        norm: dict[str, Any] = {
            "max_new_tokens": _as_int("max_new_tokens", self.max_new_tokens),
            "temperature": _as_float("temperature", self.temperature),
            "top_k": None if self.top_k is None else _as_int("top_k", self.top_k),
            "top_p": _as_float("top_p", self.top_p),
            "min_p": None if self.min_p is None else _as_float("min_p", self.min_p),
            "repetition_penalty": _as_float("repetition_penalty", self.repetition_penalty),
            "seed": None if self.seed is None else _as_int("seed", self.seed),
            "eos_token_ids": _as_token_ids("eos_token_ids", self.eos_token_ids),
            "pad_token_id": None if self.pad_token_id is None else _as_int("pad_token_id", self.pad_token_id),
        }
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise InputError(f"generation setting do_sample must be true or false, got {self.do_sample!r}")
        norm["do_sample"] = bool(self.do_sample)
        for key, value in norm.items():
            object.__setattr__(self, key, value)

        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and not (_MIN_SCALE <= self.temperature <= _MAX_SCALE):
            raise InputError(
                f"temperature must be between {_MIN_SCALE:g} and {_MAX_SCALE:g} when sampling, got {self.temperature} "
                "(logits divided by a smaller one overflow float32); for greedy decoding set do_sample=False instead"
            )
        if self.top_k is not None and self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 disables top-k), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InputError(f"top_p must be in (0, 1] (1.0 disables nucleus sampling), got {self.top_p}")
        if self.min_p is not None and not (0.0 <= self.min_p <= 1.0):
            raise InputError(f"min_p must be in [0, 1] or unset, got {self.min_p}")
        if not (_MIN_SCALE <= self.repetition_penalty <= _MAX_SCALE):
            raise InputError(
                f"repetition_penalty must be between {_MIN_SCALE:g} and {_MAX_SCALE:g} (1.0 disables it), got "
                f"{self.repetition_penalty}"
            )
        if self.seed is not None and self.seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {self.seed}")

    @property
    def resolved_pad_token_id(self) -> int | None:
        """transformers' _prepare_special_tokens: without a pad id, finished rows are padded with eos[0]."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def from_generation_config(cls, d: dict | None, **overrides: Any) -> GenerationSettings:
        """Settings from a generation_config.json dict plus ``generate(**kwargs)``-style overrides.

        Precedence as transformers' ``_prepare_generation_config``: an override that is not None, else a
        non-null value in ``d``, else transformers' global default (top_k=50, temperature=1.0, ...).
        ``max_new_tokens`` defaults to 20; ``max_length`` in ``d`` is ignored (it counts the prompt).
        ``eos_token_id`` (the transformers name) is accepted as an alias of ``eos_token_ids``; a missing
        ``pad_token_id`` falls back to the first eos id, as ``_prepare_special_tokens`` does.
        """
        d = dict(d or {})
        unknown = set(overrides) - _OVERRIDE_NAMES
        if unknown:
            raise TypeError(
                f"unknown generation override(s) {sorted(unknown)}; expected some of {sorted(_OVERRIDE_NAMES)}"
            )
        if overrides.get("eos_token_ids") is not None and overrides.get("eos_token_id") is not None:
            raise TypeError("pass eos_token_ids or its alias eos_token_id, not both")

        def pick(name: str, key: str | None, default: Any) -> Any:
            value = overrides.get(name)
            if value is None and key is not None:
                value = d.get(key)
            return default if value is None else value

        ignored = {
            k: d[k] for k, inert in _UNSUPPORTED_KEYS.items() if d.get(k) is not None and d[k] != inert and d[k] != []
        }
        if ignored:
            logger.warning(
                "generation_config settings not supported by the runtime are ignored, so output may differ "
                "from transformers: %s",
                ignored,
            )

        eos = overrides.get("eos_token_ids")
        if eos is None:
            eos = overrides.get("eos_token_id")
        if eos is None:
            eos = d.get("eos_token_id")
        eos_ids = _as_token_ids("eos_token_id", eos)
        pad = pick("pad_token_id", "pad_token_id", None)
        if pad is None and eos_ids:
            pad = eos_ids[0]

        return cls(
            max_new_tokens=pick("max_new_tokens", "max_new_tokens", _DEFAULT_MAX_NEW_TOKENS),
            do_sample=pick("do_sample", "do_sample", False),
            temperature=pick("temperature", "temperature", 1.0),
            top_k=pick("top_k", "top_k", _DEFAULT_TOP_K),
            top_p=pick("top_p", "top_p", 1.0),
            min_p=pick("min_p", "min_p", None),
            repetition_penalty=pick("repetition_penalty", "repetition_penalty", 1.0),
            seed=pick("seed", None, None),
            eos_token_ids=eos_ids,
            pad_token_id=pad,
        )


# ---------------------------------------------------------------------------------------------------------
# Logits processors (each mirrors one transformers class; scores are float32 [B, V] and modified in place)


def _padding_lengths(attention_mask: np.ndarray) -> np.ndarray:
    """Leading pad count per row: ``(mask != 0).int().argmax(dim=1)`` as in _get_logits_processor."""
    return np.argmax(np.asarray(attention_mask) != 0, axis=1)


def _repetition_penalty(scores: np.ndarray, input_ids: np.ndarray, penalty: float, ignore: np.ndarray | None) -> None:
    """RepetitionPenaltyLogitsProcessor: every distinct id seen once, ``<0 ? s*p : s/p`` in float32.

    Ids at positions before ``ignore[b]`` (left padding) and ids outside [0, V) are skipped, as
    transformers does by mapping them to an extra column that it drops.
    """
    vocab = scores.shape[1]
    valid = (input_ids >= 0) & (input_ids < vocab)
    if ignore is not None:
        positions = np.arange(input_ids.shape[1])
        valid &= positions[None, :] >= ignore[:, None]
    rows, cols = np.nonzero(valid)
    ids = input_ids[rows, cols]
    picked = scores[rows, ids]
    p = np.float32(penalty)
    scores[rows, ids] = np.where(picked < 0, picked * p, picked / p)


def _top_k(scores: np.ndarray, top_k: int) -> None:
    """TopKLogitsWarper: drop scores strictly below the k-th largest (ties with it all survive)."""
    vocab = scores.shape[-1]
    k = min(max(top_k, 1), vocab)  # min_tokens_to_keep=1, then the "safety check" clamp to V
    if k >= vocab:
        return
    # np.partition, like torch.topk, orders NaN as the largest value; `x < nan` is False everywhere.
    kth = np.partition(scores, vocab - k, axis=-1)[:, vocab - k : vocab - k + 1]
    scores[scores < kth] = -np.inf


def _softmax32(values: np.ndarray) -> np.ndarray:
    """float32 softmax along the last axis (computed in float64, then rounded: closest to torch's)."""
    with np.errstate(invalid="ignore", over="ignore"):
        v = values.astype(np.float64)
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _stable_ascending_order(values: np.ndarray) -> np.ndarray:
    """``np.argsort(values, kind="stable")`` for finite float32, several times faster on 152k entries.

    Each value's bits are mapped to an int32 with the same order, and the position is packed into the low
    32 bits of an int64 key: keys are unique, so an unstable (vectorised) sort gives the stable order.
    """
    bits = (values.astype(np.float32) + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))
    keys = (ordered.astype(np.int64) << 32) | np.arange(values.size, dtype=np.int64)
    keys.sort()
    return keys & np.int64(0xFFFFFFFF)


def _top_p(scores: np.ndarray, top_p: float) -> None:
    """TopPLogitsWarper with min_tokens_to_keep=1.

    transformers sorts the whole row ascending, takes the float32 softmax, accumulates it (torch's CPU
    cumsum accumulates in double and rounds each prefix to float32) and removes positions whose cumulative
    probability is ``<= 1 - top_p``, except the last (largest). Entries already at -inf have probability 0
    and sort first, so only the finite candidates need sorting. A row with NaN or +inf has a NaN softmax, so
    transformers removes nothing from it; neither do we.
    """
    threshold = np.float32(1.0 - top_p)  # torch rounds the python scalar to float32 for the comparison
    for row in scores:
        if np.isnan(row).any() or np.isposinf(row).any():
            continue
        cand = np.flatnonzero(row > -np.inf)
        if cand.size <= 1:
            continue
        order = _stable_ascending_order(row[cand])
        probs = _softmax32(row[cand[order]])
        cumulative = np.cumsum(probs, dtype=np.float64).astype(np.float32)
        remove = cumulative <= threshold
        remove[-1] = False
        row[cand[order[remove]]] = -np.inf


def _min_p(scores: np.ndarray, min_p: float) -> None:
    """MinPLogitsWarper: drop tokens with ``prob < min_p * max_prob`` (the top token always survives)."""
    probs = _softmax32(scores)
    with np.errstate(invalid="ignore"):
        scaled = probs.max(axis=-1, keepdims=True) * np.float32(min_p)
        remove = probs < scaled
    scores[remove] = -np.inf


# ---------------------------------------------------------------------------------------------------------


class TokenSelector:
    """Turns last-position logits into next tokens the way transformers' ``_sample`` does."""

    def __init__(self, settings: GenerationSettings):
        self.settings = settings
        # One generator per generation: a seed makes a whole run reproducible.
        self.rng = np.random.default_rng(settings.seed)

    def process_logits(
        self, logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Scores transformers would pass to softmax/argmax: float32 [B, V], a new array.

        Order as ``_get_logits_processor``: repetition penalty, then (sampling only) temperature, top-k,
        top-p, min-p. ``input_ids`` is prompt + generated so far, padding included; ``attention_mask`` is
        the prompt's mask given to ``generate`` (an extended mask gives the same answer unless a prompt row
        is all padding): the repetition penalty ignores each row's left padding, as transformers does.
        """
        scores = np.array(logits, dtype=np.float32, copy=True)
        ids = np.asarray(input_ids)
        if scores.ndim != 2 or ids.ndim != 2 or ids.shape[0] != scores.shape[0]:
            raise ValueError(f"expected logits [B, V] and input_ids [B, L], got {scores.shape} and {ids.shape}")
        s = self.settings
        if s.repetition_penalty != 1.0:
            ignore = None if attention_mask is None else _padding_lengths(attention_mask)
            _repetition_penalty(scores, ids.astype(np.int64, copy=False), s.repetition_penalty, ignore)
        if s.do_sample:
            if s.temperature != 1.0:
                scores /= np.float32(s.temperature)
            if s.top_k:
                _top_k(scores, s.top_k)
            if s.top_p < 1.0:
                _top_p(scores, s.top_p)
            if s.min_p is not None:
                _min_p(scores, s.min_p)
        return scores

    def select(self, logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Next token per row, int64 [B]: ``argmax`` (first maximum, like torch) or a sample.

        Sampling draws one uniform per row per call, from the processed scores' float32 softmax; tokens
        with probability 0 (filtered to -inf, or underflowed) are never returned.
        """
        scores = self.process_logits(logits, input_ids, attention_mask)
        if not self.settings.do_sample:
            return np.argmax(scores, axis=-1).astype(np.int64)
        uniforms = self.rng.random(scores.shape[0])
        invalid = np.isnan(scores).any(axis=-1) | np.isposinf(scores).any(axis=-1)
        out = np.empty(scores.shape[0], dtype=np.int64)
        for b, (row, u) in enumerate(zip(scores, uniforms, strict=True)):
            cand = np.flatnonzero(row > -np.inf)
            if cand.size == 0 or invalid[b]:
                # torch.multinomial raises on the NaN softmax of such a row too.
                raise RuntimeError(f"cannot sample row {b}: its scores are NaN/+inf or every token was filtered out")
            probs = _softmax32(row[cand])
            keep = probs > 0
            cand, probs = cand[keep], probs[keep]
            cdf = np.cumsum(probs, dtype=np.float64)
            idx = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
            out[b] = cand[min(idx, cand.size - 1)]
        return out


def apply_finished(next_tokens: np.ndarray, unfinished: np.ndarray, pad_token_id: int | None) -> np.ndarray:
    """Finished rows get ``pad_token_id`` instead of their token (``_sample``'s unfinished_sequences).

    transformers only does this when there is an eos criterion, and then a pad id always exists (it falls
    back to eos[0]); with ``pad_token_id`` None the tokens are returned unchanged.
    """
    tokens = np.asarray(next_tokens, dtype=np.int64)
    if pad_token_id is None:
        return tokens.copy()
    return np.where(np.asarray(unfinished, dtype=bool), tokens, np.int64(pad_token_id))


def eos_reached(new_tokens: np.ndarray, eos_token_ids: tuple[int, ...] | np.ndarray) -> np.ndarray:
    """EosTokenCriteria for one new token per row: bool [B], true where the token is an eos id."""
    return np.isin(np.asarray(new_tokens), np.asarray(eos_token_ids, dtype=np.int64))


class StopChecker:
    """Tracks which rows are finished, like ``_sample``'s ``unfinished_sequences`` and its criteria.

    Per step: ``tokens = checker.step(selected)`` pads finished rows, then marks rows whose (padded) token is
    an eos id (EosTokenCriteria) and, after ``max_new_tokens`` steps, every row (MaxLengthCriteria with
    ``max_length = prompt + max_new_tokens``). Append ``tokens`` to every row and stop when ``done``.
    """

    def __init__(self, settings: GenerationSettings, batch_size: int):
        self.eos_token_ids = np.asarray(settings.eos_token_ids, dtype=np.int64)
        self.pad_token_id = settings.resolved_pad_token_id
        self.max_new_tokens = settings.max_new_tokens
        self.unfinished = np.ones(batch_size, dtype=bool)
        self.hit_eos = np.zeros(batch_size, dtype=bool)
        self.num_generated = 0

    @property
    def has_eos(self) -> bool:
        return self.eos_token_ids.size > 0

    @property
    def done(self) -> bool:
        return not bool(self.unfinished.any())

    def step(self, next_tokens: np.ndarray) -> np.ndarray:
        """Tokens to append this step (int64 [B]); updates ``unfinished``, ``hit_eos`` and the count."""
        if self.has_eos:
            tokens = apply_finished(next_tokens, self.unfinished, self.pad_token_id)
            newly = self.unfinished & eos_reached(tokens, self.eos_token_ids)
            self.hit_eos |= newly
            self.unfinished &= ~newly
        else:
            tokens = np.asarray(next_tokens, dtype=np.int64).copy()
        self.num_generated += 1
        if self.num_generated >= self.max_new_tokens:
            self.unfinished[:] = False
        return tokens


def token_logprobs(logits: np.ndarray, tokens: np.ndarray, top_n: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-probabilities under the model's raw distribution (log-softmax of the logits, before repetition
    penalty, temperature or top-k/p: the model's own belief, comparable across sampling settings, as vLLM's
    default `raw_logprobs`).

    Returns the chosen `tokens`' logprobs [B] and the `top_n` most likely ids [B, top_n] with their logprobs
    [B, top_n], most likely first (ties: lower id first).
    """
    scores = np.asarray(logits, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"expected logits [B, V], got {scores.shape}")
    shifted = scores - scores.max(axis=-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    rows = np.arange(scores.shape[0])
    chosen = logprobs[rows, np.asarray(tokens, dtype=np.int64)]
    top_n = min(max(int(top_n), 0), scores.shape[1])
    if top_n == 0:
        empty = np.zeros((scores.shape[0], 0))
        return chosen.astype(np.float32), empty.astype(np.int64), empty.astype(np.float32)
    part = np.argpartition(-logprobs, top_n - 1, axis=-1)[:, :top_n]
    # Sort the candidates: by logprob descending, then id ascending.
    order = np.lexsort((part, -np.take_along_axis(logprobs, part, axis=-1)), axis=-1)
    top_ids = np.take_along_axis(part, order, axis=-1)
    top = np.take_along_axis(logprobs, top_ids, axis=-1)
    return chosen.astype(np.float32), top_ids.astype(np.int64), top.astype(np.float32)
