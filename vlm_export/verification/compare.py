"""Stage-by-stage comparison of our runtime with a transformers `Reference` (torch-free).

Stages in pipeline order, so the first failing one names where an export goes wrong: prompt ids, preprocessing,
rope index, vision, merge, prefill logits, step logits, tokens (exact profiles) or teacher-forced agreement
(approximate ones). Arrays are compared where the reference kept them: everything in a live transformers run,
the sampled elements in golden files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlm_export.verification.golden import Reference, Sampled
from vlm_export.verification.observe import Observation
from vlm_export.verification.thresholds import NEAR_TIE, Thresholds


@dataclass
class Stage:
    stage: str
    passed: bool | None  # None: information only
    measured: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseResult:
    name: str
    description: str
    stages: list[Stage] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(stage.passed is not False for stage in self.stages)

    @property
    def first_failure(self) -> Stage | None:
        return next((stage for stage in self.stages if stage.passed is False), None)


def _fmt(value: float) -> str:
    return f"{value:.2g}" if value else "0"


class CaseComparison:
    """Compares one case; `forced` gives our teacher-forced logits for transformers' tokens when needed."""

    def __init__(
        self,
        reference: Reference,
        observation: Observation,
        thresholds: Thresholds,
        forced: Callable[[np.ndarray], np.ndarray],
        decode: Callable[[list[int]], str],
        eos_ids: list[int],
    ):
        self.ref, self.obs, self.limits = reference, observation, thresholds
        self.forced, self.decode, self.eos = forced, decode, set(eos_ids)

    def stages(self) -> list[Stage]:
        prompt = self._prompt_ids()
        if not prompt.passed:
            return [prompt, Stage("later stages", None, "not compared: the prompts differ")]
        stages = [prompt, *self._preprocessing(), *self._positions(), *self._vision(), self._merge()]
        stages += self._logits_and_tokens()
        return stages

    # -- host side --------------------------------------------------------------------------------------------
    def _prompt_ids(self) -> Stage:
        theirs, ours = self.ref.prompt_ids, self.obs.prompt_ids
        if theirs == ours:
            lengths = "+".join(str(len(row)) for row in ours)
            return Stage("prompt ids", True, f"equal ({lengths} tokens)")
        for row, (a, b) in enumerate(zip(theirs, ours, strict=False)):
            if a != b:
                at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                return Stage(
                    "prompt ids",
                    False,
                    f"row {row} differs at token {at} of {len(a)}/{len(b)}: transformers "
                    f"{self.decode(a[at : at + 6])!r} vs ours {self.decode(b[at : at + 6])!r}",
                    {"row": row, "position": at},
                )
        return Stage("prompt ids", False, f"{len(theirs)} prompts in transformers, {len(ours)} in ours")

    def _preprocessing(self) -> list[Stage]:
        ref, ours = self.ref.pixels, self.obs.pixels
        if ours is None and ref is None:
            return []
        if ref is None:
            return [Stage("preprocessing", None, "n/a: images and videos in one case, compared through vision")]
        if ours is None or tuple(ours.shape) != ref.shape:
            shown = None if ours is None else tuple(ours.shape)
            return [Stage("preprocessing", False, f"pixel shape {shown} vs transformers' {ref.shape}")]
        diff = float(np.abs(ref.take(ours) - ref.values).max()) if ref.values.size else 0.0
        relative = diff / max(1.0, ref.absmax)
        return [
            Stage(
                "preprocessing",
                relative <= self.limits.pixels,
                f"max |diff| {_fmt(diff)} over pixels {ref.shape} (limit {self.limits.pixels:g} of max(1, |ref|))",
                {"max_abs_diff": diff, "relative": relative},
            )
        ]

    def _positions(self) -> list[Stage]:
        theirs, ours = self.ref.positions, self.obs.positions
        if theirs is None:
            return []
        if theirs.ndim == ours.ndim and theirs.shape[1:] == ours.shape[1:] and theirs.shape[0] > ours.shape[0]:
            theirs = theirs[-ours.shape[0] :]  # transformers prepends the text positions to M-RoPE's three rows
        if theirs.shape != ours.shape:
            return [Stage("rope index", False, f"shape {ours.shape} vs transformers' {theirs.shape}")]
        valid = np.broadcast_to(self.obs.attention_mask.astype(bool), ours.shape)
        wrong = (theirs != ours) & valid
        if not wrong.any():
            return [Stage("rope index", True, f"exact ({' x '.join(map(str, ours.shape))})")]
        first = tuple(int(i) for i in np.argwhere(wrong)[0])
        return [
            Stage(
                "rope index",
                False,
                f"{int(wrong.sum())} positions differ, first at {first}: transformers {int(theirs[first])} vs ours "
                f"{int(ours[first])}",
                {"differing": int(wrong.sum())},
            )
        ]

    # -- graphs -----------------------------------------------------------------------------------------------
    def _error(self, ref: Sampled, ours: np.ndarray) -> tuple[float, float, float]:
        """(max |diff|, max |diff| / max(1, max |ref|), rms(diff) / rms(ref)) over the reference's elements."""
        picked = ref.take(ours)
        diff = picked - ref.values
        if not np.isfinite(picked).all():
            return float("inf"), float("inf"), float("inf")
        worst = float(np.abs(diff).max()) if diff.size else 0.0
        rms_ref = float(np.sqrt(np.mean(np.square(ref.values, dtype=np.float64)))) if diff.size else 0.0
        rms = float(np.sqrt(np.mean(np.square(diff, dtype=np.float64)))) if diff.size else 0.0
        return worst, worst / max(1.0, ref.absmax), rms / rms_ref if rms_ref else rms

    def _vision(self) -> list[Stage]:
        ref, ours = self.ref.vision, self.obs.vision
        if ref is None and ours is None:
            return []
        if ref is None or ours is None or tuple(ours.shape) != ref.shape:
            shown = None if ours is None else tuple(ours.shape)
            theirs = None if ref is None else ref.shape
            return [Stage("vision", False, f"embedding rows {shown} vs transformers' {theirs}")]
        worst, relative, rms = self._error(ref, ours)
        if self.limits.exact:
            passed = relative <= self.limits.vision
            text = f"max |diff| {_fmt(worst)}, {_fmt(relative)} of max(1, |ref|) (limit {self.limits.vision:g})"
        else:
            passed = rms <= self.limits.vision
            text = f"relative rms error {_fmt(rms)} (limit {self.limits.vision:g}), max |diff| {_fmt(worst)}"
        values = {"max_abs_diff": worst, "relative": relative, "relative_rms": rms, "rows": ref.shape[0]}
        return [Stage("vision", passed, f"{text} over {ref.shape[0]} rows", values)]

    def _merge(self) -> Stage:
        ref, ours = self.ref.text, self.obs.text
        if tuple(ours.shape) != ref.shape:
            return Stage("merge", False, f"text rows {tuple(ours.shape)} vs transformers' {ref.shape}")
        worst, relative, _ = self._error(ref, ours)
        placed = self.obs.placement_diff
        passed = relative <= self.limits.text_embeddings and placed == 0.0
        text = f"text rows max |diff| {_fmt(worst)} (limit {self.limits.text_embeddings:g} of max(1, |ref|))"
        if self.obs.vision is not None:
            text += ", vision rows placed exactly" if placed == 0.0 else f", vision rows placed with |diff| {placed:g}"
        return Stage("merge", passed, text, {"max_abs_diff": worst, "relative": relative, "placement_diff": placed})

    # -- decoder ----------------------------------------------------------------------------------------------
    def _valid_steps(self) -> np.ndarray:
        """[B, T]: steps up to and including each row's first EOS in transformers' tokens."""
        tokens = self.ref.tokens
        hit = np.isin(tokens, list(self.eos)) if self.eos else np.zeros_like(tokens, dtype=bool)
        finished_before = np.cumsum(hit, axis=1) - hit
        return finished_before == 0

    def _trimmed(self, row: np.ndarray) -> list[int]:
        out = []
        for token in row.tolist():
            out.append(int(token))
            if token in self.eos:
                break
        return out

    def _logits_and_tokens(self) -> list[Stage]:
        ref, obs = self.ref, self.obs
        steps = ref.logits.steps
        valid = self._valid_steps()
        free_equal = obs.tokens.shape[1] >= steps and bool((obs.tokens[:, :steps] == ref.tokens)[valid].all())
        if self.limits.exact and free_equal:
            ours = obs.logits[:, :steps]
            how = "free-running"
        else:
            ours = self.forced(ref.tokens)
            how = "teacher-forced"
        stages = []
        for label, selection in (("prefill logits", slice(0, 1)), ("step logits", slice(1, steps))):
            mask = valid[:, selection]
            if mask.any():
                stages.append(self._logit_stage(label, ours[:, selection][mask], selection, mask, how))
        stages.append(self._tokens())
        if not self.limits.exact:
            stages.append(self._agreement(ours, valid))
        return stages

    def _logit_stage(self, label: str, ours: np.ndarray, selection: slice, mask: np.ndarray, how: str) -> Stage:
        """`ours` [n, V]: our logits at the n (row, step) pairs selected; compared at transformers' top-k ids, and
        every other id must stay below transformers' k-th logit (so a logit that jumped anywhere in the vocabulary
        is caught even where only the top k were kept), and the vocabulary's mean / std must agree."""
        top = self.ref.logits
        ids, values = top.ids[:, selection][mask], top.values[:, selection][mask]
        if not np.isfinite(ours).all():
            return Stage(label, False, "inf/NaN in our logits where transformers' are finite", {"finite": False})
        with np.errstate(over="ignore", invalid="ignore"):  # a damaged graph's logits reach 1e38
            return self._logit_numbers(label, ours, ids, values, selection, mask, how)

    def _logit_numbers(
        self,
        label: str,
        ours: np.ndarray,
        ids: np.ndarray,
        values: np.ndarray,
        selection: slice,
        mask: np.ndarray,
        how: str,
    ) -> Stage:
        top = self.ref.logits
        diff = np.abs(np.take_along_axis(ours, ids, -1) - values)
        worst = float(diff.max())
        scale = max(1.0, float(np.abs(values).max()))
        outside = ours.copy()
        np.put_along_axis(outside, ids, -np.inf, -1)
        excess_each = outside.max(-1) - values[:, -1]  # > 0: an id outside the top k beats transformers' k-th logit
        excess = float(excess_each.max())
        stats = max(
            float(np.abs(ours.mean(-1) - top.mean[:, selection][mask]).max()),
            float(np.abs(ours.std(-1) - top.std[:, selection][mask]).max()),
        )
        spread = max(float(top.std[:, selection][mask].mean()), 1e-12)
        error = float(np.sqrt(np.mean(np.square(diff, dtype=np.float64)))) / spread
        kept = ids.shape[-1]
        over = "the whole vocabulary" if kept == ours.shape[-1] else f"transformers' top {kept}"
        steps = f" over {int(mask.shape[1])} steps" if label == "step logits" else ""
        values_out = {"max_abs_diff": worst, "scale": scale, "relative_rms": error, "how": how, "stats_diff": stats}
        if excess > 0:
            values_out["outside_top_k_excess"] = excess
        if self.limits.exact:
            limit = self.limits.logits * scale
            passed = worst <= limit and excess <= limit and stats <= limit
            text = f"max |diff| {_fmt(worst)} (limit {limit:.2g}){steps}, {how}, on {over}"
            if excess > limit:
                row = int(np.argmax(excess_each))
                token = int(np.argmax(outside[row]))
                text += (
                    f"; token {token} {self.decode([token])!r} reaches {outside[row, token]:.4g}, above transformers' "
                    f"top {kept} (lowest {values[row, -1]:.4g})"
                )
            elif stats > limit:
                text += f"; the vocabulary's logit mean / std differ by {_fmt(stats)}"
        else:
            passed = error <= self.limits.logits
            limit_text = f"(limit {self.limits.logits:g})"
            text = f"error {_fmt(error)} of the logits' spread {limit_text}{steps}, max |diff| {_fmt(worst)}"
        return Stage(label, passed, text, values_out)

    def _divergence(self, theirs: list[int], ours: list[int]) -> int | None:
        """The first step where the token lists differ (one ending early counts); None when they are equal."""
        return next(
            (i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b),
            None if len(theirs) == len(ours) else min(len(theirs), len(ours)),
        )

    def _tokens(self) -> Stage:
        ref, obs = self.ref, self.obs
        count = sum(len(self._trimmed(row)) for row in ref.tokens)
        for row in range(ref.tokens.shape[0]):
            theirs, ours = self._trimmed(ref.tokens[row]), self._trimmed(obs.tokens[row])
            at = self._divergence(theirs, ours)
            if at is None:
                continue
            context = self.decode(theirs[max(0, at - 6) : at])
            theirs_text, ours_text = self.decode(theirs[at : at + 4]), self.decode(ours[at : at + 4])
            shown = (
                f"row {row} differs at step {at}: after {context!r} transformers {theirs_text!r}, ours {ours_text!r}"
            )
            values = {"row": row, "step": at, "transformers": theirs, "ours": ours}
            if not self.limits.exact:
                return Stage("tokens", None, shown + " (not exact in this profile: see agreement)", values)
            top = ref.logits.values[row, min(at, ref.logits.steps - 1)]
            margin = float(top[0] - top[1]) if top.size > 1 else float("inf")
            tolerance = self.limits.logits * max(1.0, float(np.abs(top).max()))
            if at < len(theirs) and at < len(ours) and margin <= 2 * tolerance:
                values["margin"] = margin
                return Stage(
                    "tokens", True, shown + f" at a near tie (transformers' top two {margin:.2g} apart)", values
                )
            return Stage("tokens", False, shown, values)
        text = " ".join(self.decode(self._trimmed(row))[:40] for row in ref.tokens)
        return Stage("tokens", True, f"{count}/{count} equal: {text!r}", {"equal": count})

    def _agreement(self, ours: np.ndarray, valid: np.ndarray) -> Stage:
        """Teacher-forced agreement. Top-1 counts a different choice as agreeing when transformers' own logits put
        it within `NEAR_TIE` of their spread from their best (a near tie that any rounding may flip); the strict
        rate is reported beside it."""
        top = self.ref.logits
        tokens = self.ref.tokens
        chosen = ours.argmax(-1)
        strict = chosen == tokens
        match = chosen[..., None] == top.ids
        # transformers' logit for our choice (where it is outside the kept top k: at most their k-th logit)
        theirs = np.where(match.any(-1), np.where(match, top.values, -np.inf).max(-1), top.values[..., -1])
        near = theirs >= top.values[..., 0] - NEAR_TIE * top.std
        top1 = (strict | near)[valid]
        top5 = (np.argpartition(-ours, 5, axis=-1)[..., :5] == tokens[..., None]).any(-1)[valid]
        rate1, rate5, rate_strict = float(top1.mean()), float(top5.mean()), float(strict[valid].mean())
        passed = rate1 >= self.limits.min_top1 and rate5 >= self.limits.min_top5
        return Stage(
            "agreement",
            passed,
            f"teacher-forced top-1 {rate1:.3f} (min {self.limits.min_top1:g}; {rate_strict:.3f} counting near ties "
            f"as misses), top-5 {rate5:.3f} (min {self.limits.min_top5:g}) over {int(valid.sum())} tokens",
            {"top1": rate1, "top1_strict": rate_strict, "top5": rate5, "positions": int(valid.sum())},
        )
