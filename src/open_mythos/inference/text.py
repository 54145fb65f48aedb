"""Token ids -> streamed text: incremental detokenisation and stop strings.

A token can end in the middle of a UTF-8 character, and a stop string can span several tokens, so
text is released only when it is final: never a trailing incomplete character (decoded as a
replacement character), and never the longest tail of the complete characters before it that
begins a stop string (it could still turn out to be one, whichever bytes come next).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.tokens: list[int] = []
        self.text = ""       # the final text so far (truncated at a stop string once one is hit)
        self.emitted = 0     # characters of `text` already released
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the newly releasable text. Sets ``stopped`` at a stop string."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self.flush()
        self.text = text
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
            end -= 1
        return self._release(end - self._stop_prefix(text[self.emitted:end]))

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest tail of ``text`` that begins a stop string."""
        for k in range(min(len(text), max((len(s) - 1 for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0

    def on_event(self, event, eos_token_ids, cancel) -> str:
        """The text released by one engine ``event`` (a TokenEvent): its token unless it is an
        end-of-sequence id, then everything left if the request finished. When the token hits a stop
        string and the request is still running, ``cancel()`` is called (the caller's way to stop it)."""
        piece, was_stopped = "", self.stopped
        if event.token is not None and event.token not in eos_token_ids:
            piece = self.push(event.token)
        if event.finish_reason is not None:
            piece += self.flush()
        elif self.stopped and not was_stopped:
            cancel()
        return piece

    def flush(self) -> str:
        """Release everything left (at the end of generation)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:end], end
        return out


def generate_text(engine, tokenizer, requests: list, stops: list[list[str]], on_piece=None) -> list[str]:
    """Run ``requests`` (inference.Request) through ``engine`` and return each one's text.

    ``stops[i]`` are request i's stop strings (the text is cut before the first one and the request
    cancelled); end-of-sequence tokens (the request's ``eos_token_ids``) are not part of the text.
    ``on_piece(i, text)`` is called with each newly final piece of request i (streaming)."""
    ids = [engine.submit(r) for r in requests]
    index = {rid: i for i, rid in enumerate(ids)}
    streams = [TextStream(tokenizer, s) for s in stops]
    pending = set(ids)
    while pending:
        for ev in engine.tick():
            i = index[ev.request_id]
            piece = streams[i].on_event(ev, requests[i].eos_token_ids, lambda: engine.cancel(ev.request_id, "stop"))
            if ev.finish_reason is not None:
                pending.discard(ev.request_id)
            if piece and on_piece is not None:
                on_piece(i, piece)
    return [s.text for s in streams]
