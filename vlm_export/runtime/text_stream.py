"""Generated token ids -> text deltas for streaming: whole UTF-8 characters only, stop strings cut out.

`IncrementalText` decodes with tokenizers' `DecodeStream` (it buffers byte-fallback and split multi-byte tokens
until a character is whole); at the end `finish` releases what is left so that the deltas always add up to
`tokenizer.decode(ids)`, the text a non-streamed request returns. `StopStrings` holds back any tail that could
still grow into a stop string, so a client never sees a stop string's prefix that later turns out to be one.
`SequenceText` combines the two and tells which tokens' text has been released (for per-token logprobs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers.decoders import DecodeStream

from vlm_export.errors import InputError
from vlm_export.runtime.tokenizer import TextTokenizer


class IncrementalText:
    """Token ids in, text deltas out; never splits a UTF-8 character."""

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        piece = self._stream.step(self.tokenizer.backend, int(token_id))
        if not piece:
            return ""
        self.emitted += piece
        return piece

    def finish(self) -> str:
        """What the stream still holds (an incomplete character decodes as U+FFFD, as `decode` does)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        rest = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += rest
        return rest


class StopStrings:
    """Cuts text at the first stop string; holds back a tail that is a prefix of one until it is decided."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise InputError("stop strings must not be empty")
        self.stops = tuple(dict.fromkeys(stops))
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of `text` (after what was held back) that can be released now; sets `stopped` on a match."""
        if self.stopped:
            return ""
        pending = self.pending + text
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.pending = ""
            return pending[: min(hits)]
        hold = self._partial_match(pending)
        self.pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold]

    def finish(self) -> str:
        """The held-back tail once generation has ended without completing a stop string."""
        rest, self.pending = ("" if self.stopped else self.pending), ""
        return rest

    def _partial_match(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best


@dataclass
class TextDelta:
    text: str  # text to send now
    tokens: int  # how many more generated tokens' text is now fully sent (their logprobs can go with it)
    stopped: bool  # a stop string completed: generation of this sequence should end


class SequenceText:
    """One sequence's streamed text: `IncrementalText`, then `StopStrings`, with per-token release counts."""

    def __init__(self, tokenizer: TextTokenizer, stops: Sequence[str] = (), skip_special_tokens: bool = True):
        self.decoder = IncrementalText(tokenizer, skip_special_tokens)
        self.stops = StopStrings(stops) if stops else None
        self.text = ""  # everything released so far
        self._decoded = 0  # characters decoded so far (before stop-string hold-back)
        # Decoded length once each token's text is out (None while its bytes wait for the rest of a character).
        self._token_ends: list[int | None] = []
        self._released = 0  # tokens whose text is fully released

    @property
    def stopped(self) -> bool:
        return self.stops is not None and self.stops.stopped

    def push(self, token_id: int) -> TextDelta:
        piece = self.decoder.push(token_id)
        self._token_ends.append(None)
        if piece:
            self._decoded += len(piece)
            self._resolve()
        return self._release(piece, final=False)

    def _resolve(self) -> None:
        for index in range(len(self._token_ends) - 1, -1, -1):
            if self._token_ends[index] is not None:
                break
            self._token_ends[index] = self._decoded

    def finish(self) -> TextDelta:
        """Release what is held (call once, after the last token unless a stop string ended the sequence)."""
        if self.stopped:
            return TextDelta("", 0, True)
        piece = self.decoder.finish()
        self._decoded += len(piece)
        self._resolve()
        return self._release(piece, final=True)

    def _release(self, piece: str, final: bool) -> TextDelta:
        if self.stops is None:
            out = piece
        else:
            out = self.stops.push(piece)
            if final and not self.stops.stopped:
                out += self.stops.finish()
        self.text += out
        # Tokens are released in order; after a stop, those that reached into the stop string never are.
        released = self._released
        while released < len(self._token_ends):
            end = self._token_ends[released]
            if end is None or end > len(self.text):
                break
            released += 1
        count = released - self._released
        self._released += count
        return TextDelta(out, count, self.stopped)
