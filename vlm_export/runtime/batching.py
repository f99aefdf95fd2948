"""Continuous batching: sequences join a running batch between decode steps and leave it when they finish.

A new sequence is prefilled alone (vision encoder, embedding merge, decoder prefill at batch 1), picks its first
token at once, and joins the others at the next step; a finished or cancelled one leaves before it. Each decode
step then runs every sequence in one left-padded decoder call, so a step costs little more than one sequence's
(the weights are read once for all rows), while each sequence keeps what it would get alone: its own settings and
random generator (`TokenSelector` per sequence), its own positions (the family's decode state per row, e.g.
Qwen's rope deltas) and its own cache rows, right-aligned so that its columns are masked padding before its own.

Joining and leaving reassemble the cache on the host (`GraphSession.to_numpy`, then `upload`): one copy of the
batch's cache per change of membership, small beside the decode steps in between. The running rows are copied
out before a newcomer's prefill because a backend may reuse a cache buffer per input name (TensorRT does).
Leading columns that are padding in every remaining row are dropped on the way.

Family decode state must be None or an array with the batch on axis 0 (what every family returns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlm_export.errors import InputError
from vlm_export.runtime.families import VisualBatch
from vlm_export.runtime.generation import CachedDecoding, Generator, left_pad
from vlm_export.runtime.sampling import GenerationSettings, TokenSelector


class Sequence:
    """One request's tokens in a `ContinuousBatch`: prompt, settings, what it generated and why it ended."""

    def __init__(self, prompt: list[int], settings: GenerationSettings, max_new: int, tag: Any = None):
        self.prompt = list(prompt)
        self.settings = settings
        self.max_new = max_new
        self.tag = tag  # the caller's handle
        self.generated: list[int] = []
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled"
        self.timings: dict[str, float] = {}
        self._selector = TokenSelector(settings)
        self._eos = frozenset(settings.eos_token_ids)
        self._no_ids = np.zeros((1, 0), dtype=np.int64)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.max_new - len(self.generated)

    def finish(self, reason: str) -> None:
        """End the sequence (a stop string matched, the client left); it leaves the batch before the next step."""
        if self.finish_reason is None:
            self.finish_reason = reason

    def _choose(self, logits: np.ndarray) -> int:
        ids = self._no_ids
        if self.settings.repetition_penalty != 1.0:
            ids = np.asarray([self.prompt + self.generated], dtype=np.int64)
        return int(self._selector.select(logits[None, :], ids)[0])

    def _record(self, logits: np.ndarray) -> SequenceStep:
        token = self._choose(logits)
        self.generated.append(token)
        if token in self._eos:
            self.finish("stop")
        elif self.remaining <= 0:
            self.finish("length")
        return SequenceStep(self, token, logits)


@dataclass
class SequenceStep:
    """A token one sequence chose, with the raw logits it was chosen from ([V], for logprobs)."""

    sequence: Sequence
    token: int
    logits: np.ndarray


@dataclass
class _HostRows:
    """Rows of a decoding copied to the host: cache [b, heads, length, head_dim] per past input, mask, state."""

    sequences: list[Sequence]
    cache: dict[str, np.ndarray]
    mask: np.ndarray
    state: np.ndarray | None
    lengths: np.ndarray = field(init=False)  # attended tokens per row (the rest is left padding)

    def __post_init__(self) -> None:
        self.lengths = self.mask.sum(axis=1)

    def keep(self) -> _HostRows | None:
        alive = [i for i, s in enumerate(self.sequences) if not s.finished]
        if len(alive) == len(self.sequences):
            return self
        if not alive:
            return None
        return _HostRows(
            [self.sequences[i] for i in alive],
            {name: value[alive] for name, value in self.cache.items()},
            self.mask[alive],
            None if self.state is None else self.state[alive],
        )


class ContinuousBatch:
    """Sequences decoding together; `add` one at any time, `step` all of them by one token."""

    INITIAL_ROOM = CachedDecoding.INITIAL_ROOM

    def __init__(self, generator: Generator, max_batch: int | None = None):
        limit = generator.manifest.limits.max_batch
        self.generator = generator
        self.max_batch = max_batch or limit or 1
        if limit is not None and self.max_batch > limit:
            raise InputError(
                f"a batch of {self.max_batch} exceeds this export's limit of {limit}; use at most {limit} or "
                "re-export with a larger --max-batch"
            )
        self._rows: list[Sequence] = []  # rows of `_decoding`, in order
        self._decoding: CachedDecoding | None = None
        self._host: list[_HostRows] = []  # rows waiting on the host to be assembled into the next decoding

    @property
    def sequences(self) -> list[Sequence]:
        """Sequences still decoding (running or about to join)."""
        rows = self._rows + [s for part in self._host for s in part.sequences]
        return [s for s in rows if not s.finished]

    def __len__(self) -> int:
        return len(self.sequences)

    def add(
        self, prompt: list[int], visual: VisualBatch, settings: GenerationSettings, tag: Any = None
    ) -> SequenceStep:
        """Prefill one sequence alone and choose its first token; it joins the batch at the next `step`.

        Raises `InputError` for a prompt over the export's limit or a batch already full.
        """
        if len(self) >= self.max_batch:
            raise InputError(f"the batch is full ({self.max_batch} sequences); wait for one to finish")
        self.generator.check_limits([prompt])
        max_new = self.generator.max_new_tokens(settings.max_new_tokens, len(prompt))
        sequence = Sequence(prompt, settings, max_new, tag)
        self._to_host()  # the prefill may reuse the running rows' cache buffers
        pad_id = settings.resolved_pad_token_id or 0
        input_ids, attention_mask = left_pad([prompt], pad_id)
        decoding = self.generator.prefill(input_ids, attention_mask, visual, max_new, sequence.timings)
        step = sequence._record(decoding.logits()[0])
        if not sequence.finished:
            self._host.append(self._snapshot(decoding, [sequence]))
        return step

    def step(self) -> list[SequenceStep]:
        """One decode step for every unfinished sequence (newcomers included): their next tokens, in batch order."""
        if self._decoding is not None and any(s.finished for s in self._rows):
            self._to_host()
        if self._decoding is None:
            self._assemble()
        if self._decoding is None:
            return []
        pending = np.asarray([s.generated[-1] for s in self._rows], dtype=np.int64)
        self._decoding.advance(pending)
        logits = self._decoding.logits()
        return [s._record(logits[i]) for i, s in enumerate(self._rows)]

    # -- membership changes ---------------------------------------------------------------------------------
    def _snapshot(self, decoding: CachedDecoding, sequences: list[Sequence]) -> _HostRows:
        length = decoding.attention_mask.shape[1]
        cache = {
            name: decoding.decoder.to_numpy(buffer)[:, :, :length, :].copy() for name, buffer in decoding.cache.items()
        }
        state = None if decoding.state is None else np.asarray(decoding.state)
        return _HostRows(list(sequences), cache, np.asarray(decoding.attention_mask), state)

    def _to_host(self) -> None:
        """Copy the running rows out (first in the next batch) and drop the device decoding."""
        if self._decoding is None:
            return
        self._host.insert(0, self._snapshot(self._decoding, self._rows))
        self._decoding, self._rows = None, []

    def _assemble(self) -> None:
        """One decoding from the host rows of unfinished sequences, each right-aligned at the common length."""
        parts = [kept for part in self._host if (kept := part.keep()) is not None]
        self._host = []
        if not parts:
            return
        states = [p.state for p in parts]
        if any(s is None for s in states) and not all(s is None for s in states):
            raise RuntimeError("the family returned decode state for some sequences and not for others")
        sequences = [s for p in parts for s in p.sequences]
        length = int(max(p.lengths.max() for p in parts))
        room = max(s.remaining for s in sequences)
        capacity = length + min(self.INITIAL_ROOM, room)
        batch = len(sequences)
        mask = np.zeros((batch, length), dtype=np.int64)
        # Each part's rows, and how many of its last columns to keep: columns further left are padding in all rows.
        placements, start = [], 0
        for part in parts:
            placements.append((slice(start, start + len(part.sequences)), part, min(part.mask.shape[1], length)))
            start += len(part.sequences)
        cache: dict[str, Any] = {}
        decoder = self.generator.sessions["decoder"]
        for name in self.generator.past_names:
            first = parts[0].cache[name]
            host = np.zeros((batch, first.shape[1], capacity, first.shape[3]), dtype=first.dtype)
            for rows, part, width in placements:
                host[rows, :, length - width : length] = part.cache[name][:, :, part.mask.shape[1] - width :]
            cache[name] = decoder.upload(name, host)
        for rows, part, width in placements:
            mask[rows, length - width :] = part.mask[:, part.mask.shape[1] - width :]
        state = None if states[0] is None else np.concatenate(states, axis=0)
        self._decoding = CachedDecoding.resume(self.generator, cache, mask, state, capacity, room)
        self._rows = sequences
