"""Control tokens and text: how model/chat_format.py keeps the text of a message from becoming them.

A control token is a special token of the tokenizer (BOS, EOS, pad, `<|im_start|>`, `<|im_end|>`, the
time tokens: every added token marked special). A plain tokenizer call turns each such string it
finds into its token, wherever it came from. So a message's text is first `escape`d: every control
string in it is swapped for a stand-in character from Unicode's private use area that the messages
do not use; the conversation is rendered; then `encode` splits the rendered text at the control
strings left in it (all of them the format's own) and encodes each piece between them as plain text,
with the stand-ins turned back into the strings they hold.

Encoding the pieces apart is what the tokenizer does itself: it splits its input at added tokens
before its pre-tokenizer and model see any of it. `Controls` checks that on a probe once per
tokenizer (for SentencePiece-style tokenizers that prefix the start of a string, each piece after the
first is encoded after a newline that is then taken off, as transformers' own
`sanitize_control_tokens` does), so a conversation without control text gives the same ids either way.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from persllm_cli.core.errors import PersllmError

PRIVATE_USE = 0xF0000   # Supplementary Private Use Area-A: 65,534 code points no text needs
PRIVATE_END = 0xFFFFD


@dataclass
class Controls:
    """One tokenizer's control strings, and (made on first need: copying a tokenizer takes a few tenths
    of a second) a copy of its tokenizer that reads them as text."""

    strings: tuple[str, ...]        # longest first, so a token wins over a shorter one inside it
    pattern: re.Pattern
    ids: dict[str, int]
    _plain: Any = None              # a tokenizers.Tokenizer with encode_special_tokens on
    _after_newline: bool | None = None   # how pieces after the first are encoded; None: it cannot be done
    _ready: bool = False

    def find(self, text: str) -> bool:
        return self.pattern.search(text) is not None

    def plain(self, tokenizer: Any) -> tuple[Any, bool | None]:
        """(the text-only copy of `tokenizer` (the one these controls are of) or None, how pieces after
        the first are encoded)."""
        if not self._ready:
            with _making:
                if not self._ready:
                    self._plain = _plain_copy(tokenizer)
                    if self._plain is not None and self.strings:
                        self._after_newline = _strategy(tokenizer, self)
                    self._ready = True
        return self._plain, self._after_newline


_cache: "weakref.WeakKeyDictionary[Any, tuple[int, Controls]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_making = threading.Lock()


def controls(tokenizer: Any) -> Controls:
    """The tokenizer's control strings (cached; recomputed when tokens were added since)."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else -1
    try:
        with _lock:
            hit = _cache.get(tokenizer)
        if hit is not None and hit[0] == size:
            return hit[1]
        found = _make(tokenizer)
        with _lock:
            _cache[tokenizer] = (size, found)
        return found
    except TypeError:   # a tokenizer that cannot be weakly referenced: not cached
        return _make(tokenizer)


def _make(tokenizer: Any) -> Controls:
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    strings = {t.content for t in added.values() if getattr(t, "special", False)}
    strings |= {s for s in (getattr(tokenizer, "all_special_tokens", None) or []) if isinstance(s, str)}
    strings = tuple(sorted((s for s in strings if s), key=len, reverse=True))
    pattern = re.compile("|".join(map(re.escape, strings)) or "(?!)")   # (?!) never matches
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in strings}
    return Controls(strings, pattern, ids)


def _plain_copy(tokenizer: Any) -> Any:
    """A copy of a fast tokenizer's backend that encodes special-token strings as text. A copy, so no
    flag on the shared tokenizer is ever flipped (serve encodes in several threads at once)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.encode_special_tokens = True
    plain.no_truncation()
    plain.no_padding()
    return plain


def _strategy(tokenizer: Any, c: Controls) -> bool | None:
    """How pieces between control tokens encode like the whole text does: alone (False), after a
    newline taken off again (True), or neither (None: control text in a message is then refused)."""
    mark = next((s for s in c.strings if not s.isspace()), c.strings[0])
    probes = [f"{mark}Who are you?{mark}\n  two  words {mark} x{mark}\n\nend. {mark}",
              f"Hi there{mark} a{mark}{mark}\tb \n"]
    want = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in probes]
    for after_newline in (False, True):
        try:
            if [_encode_pieces(c._plain, after_newline, c, p, None, offsets=False)[0] for p in probes] == want:
                return after_newline
        except PersllmError:
            pass
    return None


def escape(messages: list[dict[str, str]], c: Controls) -> tuple[list[dict[str, str]], dict[int, str] | None]:
    """The messages with each control string in their content held by a stand-in character, and the
    table that turns the stand-ins back (None, and the messages as they are, when none has any)."""
    if not any(c.find(m["content"]) for m in messages):
        return messages, None
    used = {ord(ch) for m in messages for ch in m["content"] if ord(ch) >= PRIVATE_USE}
    n = len(c.strings)
    start = PRIVATE_USE
    while any(start + k in used for k in range(n)):
        start += n
        if start + n > PRIVATE_END:
            raise PersllmError("a message uses too much of Unicode's private use area to be encoded safely")
    stand_in = {s: chr(start + k) for k, s in enumerate(c.strings)}
    out = [{**m, "content": c.pattern.sub(lambda hit: stand_in[hit.group(0)], m["content"])} for m in messages]
    return out, {ord(ch): s for s, ch in stand_in.items()}


def unescape(text: str, table: dict[int, str] | None) -> str:
    return text.translate(table) if table else text


def encode(tokenizer: Any, text: str, table: dict[int, str] | None,
           offsets: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (and character offsets in the unescaped text) of a rendered conversation. Without a
    table (no message held control text) this is one plain tokenizer call, as it always was."""
    if table is None:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]] if offsets else []
    c = controls(tokenizer)
    plain, after_newline = c.plain(tokenizer)
    if plain is None or after_newline is None:
        raise PersllmError("a message holds text that this model's tokenizer would read as a control token "
                           f"({', '.join(sorted(set(table.values())))}), and it cannot encode that as plain text "
                           "(it needs a fast tokenizer that splits at its added tokens)")
    return _encode_pieces(plain, after_newline, c, text, table, offsets)


def _encode_pieces(plain: Any, after_newline: bool, c: Controls, text: str, table: dict[int, str] | None,
                   offsets: bool) -> tuple[list[int], list[tuple[int, int]]]:
    ids: list[int] = []
    offs: list[tuple[int, int]] = []
    pos = 0   # where the next piece starts in the unescaped text
    last = 0
    forbidden = set(c.ids.values())
    for hit in [*c.pattern.finditer(text), None]:
        piece = unescape(text[last:hit.start() if hit else len(text)], table)
        if piece:
            p_ids, p_offs = _plain_piece(plain, after_newline, piece, first=last == 0)
            if forbidden.intersection(p_ids):
                raise PersllmError("this model's tokenizer reads part of a message as a control token even as "
                                   "plain text; the message cannot be encoded safely")
            ids += p_ids
            offs += [(pos + a, pos + b) for a, b in p_offs]
            pos += len(piece)
        if hit is None:
            break
        ids.append(c.ids[hit.group(0)])
        offs.append((pos, pos + len(hit.group(0))))
        pos += len(hit.group(0))
        last = hit.end()
    return ids, offs if offsets else []


def _plain_piece(plain: Any, after_newline: bool, piece: str, first: bool) -> tuple[list[int], list[tuple[int, int]]]:
    # encode_batch, not encode: it lets other threads run meanwhile (serve's event loop among them).
    if after_newline and not first:
        newline = plain.encode_batch(["\n"], add_special_tokens=False)[0].ids
        enc = plain.encode_batch(["\n" + piece], add_special_tokens=False)[0]
        if enc.ids[:len(newline)] == newline:
            return enc.ids[len(newline):], [(max(0, a - 1), max(0, b - 1)) for a, b in enc.offsets[len(newline):]]
    enc = plain.encode_batch([piece], add_special_tokens=False)[0]
    return enc.ids, list(enc.offsets)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` read as text only (no control token from it, whatever it spells)."""
    held, table = escape([{"content": text}], controls(tokenizer))
    if table is None:
        return tokenizer.encode(text, add_special_tokens=False)
    return encode(tokenizer, held[0]["content"], table)[0]
