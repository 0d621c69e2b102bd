"""JSON mode (`response_format: {"type": "json_object"}`): only tokens that keep the output valid JSON.

A byte-level pushdown automaton follows the JSON grammar (RFC 8259, with a top-level object as OpenAI's
JSON mode requires). Before each draw, every token whose bytes would break the grammar from the current
state is masked out; when the top-level object closes, the sequence ends. The output therefore always
parses, even when the token budget runs out (below).

Masks depend only on the automaton state, and the same states come back again and again (inside a
string, between members...), so each state's mask is computed once per vocabulary and cached. A mask is
computed by walking the vocabulary sorted by bytes, so tokens sharing a prefix share its work, and a
prefix that fails rules out every token that starts with it.

A reply finishes what it starts. Every state has a shortest way to a complete object (`closing`:
close the string, give a pending key the value 0, close the brackets), and the walk records, for each
token, how long that way is after it. Before each draw the constraint allows only tokens whose way
still fits in the tokens left (one byte per token at worst: byte-level vocabularies have a token for
every byte), so when `max_tokens` or the context runs out the object is closed and parses. Such a
reply still says `finish_reason: "length"` (the budget cut it short), as does one cut where no
closing could fit (`max_tokens` 1).

Small models also loop: the same few tokens again and again ("FF, FF, FF, ..."), which JSON allows
forever. When the reply's last tokens are one short unit repeated (LOOP_SPAN tokens in all, at least
LOOP_REPEATS times), the string the loop is in, or else the innermost array or object, is closed by the
shortest way, then the model goes on freely. Nesting deeper than MAX_DEPTH is refused, the way
indentation is bounded above.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch

WHITESPACE = frozenset(b" \t\n\r")
# Whitespace between tokens of JSON: enough to indent deeply nested output, not enough to loop forever
# on newlines or spaces (the classic failure of small models in JSON mode). Indentation is counted
# from the last newline.
MAX_WHITESPACE = 64  # spaces, tabs and carriage returns in a row
MAX_NEWLINES = 2  # newlines in a row: a blank line, no more
MAX_DEPTH = 64  # open objects and arrays at once
LOOP_SPAN = 16  # a repeated unit must cover at least this many tokens to count as a loop ...
LOOP_REPEATS = 3  # ... and be repeated at least this many times
MAX_LOOP_UNIT = LOOP_SPAN  # longest repeated unit looked for, in tokens
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# Number sub-states that may end the number.
_NUMBER_CAN_END = frozenset({"zero", "int", "frac", "exp"})


class State(NamedTuple):
    mode: str  # start, value, key_or_close, key, colon, after, value_or_close, str, esc, hex, num, lit, done
    stack: str = ""  # open containers, "{" and "["
    # str: (is it a key, UTF-8 continuation bytes owed); esc: is it a key; hex: (is it a key, digits
    # left); num: sub-state; lit: bytes left
    aux: object = None
    spaces: int = 0
    newlines: int = 0


START = State("start")
_WS_MODES = frozenset({"start", "value", "key_or_close", "key", "colon", "after", "value_or_close"})


def _value_done(stack: str) -> State:
    return State("after", stack) if stack else State("done")


def _start_value(byte: int, stack: str) -> State | None:
    if byte in b"{[" and len(stack) >= MAX_DEPTH:
        return None
    if byte == ord("{"):
        return State("key_or_close", stack + "{")
    if byte == ord("["):
        return State("value_or_close", stack + "[")
    if byte == ord('"'):
        return State("str", stack, (False, 0))
    if byte == ord("-"):
        return State("num", stack, "sign")
    if byte == ord("0"):
        return State("num", stack, "zero")
    if byte in _DIGITS:
        return State("num", stack, "int")
    if byte in _LITERALS:
        return State("lit", stack, _LITERALS[byte])
    return None


def _number(state: State, byte: int) -> State | None:
    sub, stack = state.aux, state.stack
    digit = byte in _DIGITS
    if sub == "sign":
        return State("num", stack, "zero" if byte == ord("0") else "int") if digit else None
    if sub in ("int", "frac", "exp") and digit:
        return state
    if sub in ("zero", "int") and byte == ord("."):
        return State("num", stack, "dot")
    if sub == "dot":
        return State("num", stack, "frac") if digit else None
    if sub in ("zero", "int", "frac") and byte in b"eE":
        return State("num", stack, "e")
    if sub == "e":
        if byte in b"+-":
            return State("num", stack, "esign")
        return State("num", stack, "exp") if digit else None
    if sub == "esign":
        return State("num", stack, "exp") if digit else None
    if sub in _NUMBER_CAN_END:  # the number ended: this byte belongs to what follows it
        return step(_value_done(stack), byte)
    return None


def _string(state: State, byte: int) -> State | None:
    """Inside a string: printable text as well-formed UTF-8 (JSON text must be UTF-8), escapes."""
    is_key, owed = state.aux  # type: ignore[misc]
    if owed:
        return State("str", state.stack, (is_key, owed - 1)) if 0x80 <= byte <= 0xBF else None
    if byte == ord('"'):
        return State("colon", state.stack) if is_key else _value_done(state.stack)
    if byte == ord("\\"):
        return State("esc", state.stack, is_key)
    if byte < 0x20:
        return None
    if byte < 0x80:
        return state
    # The lead byte says how many continuation bytes follow (overlong and surrogate forms are not told
    # apart: the detokenizer would show them as U+FFFD, still valid JSON).
    owed = 1 if 0xC2 <= byte <= 0xDF else 2 if 0xE0 <= byte <= 0xEF else 3 if 0xF0 <= byte <= 0xF4 else 0
    return State("str", state.stack, (is_key, owed)) if owed else None


def step(state: State, byte: int) -> State | None:
    """The state after one more byte, or None if the byte cannot continue valid JSON."""
    mode, stack = state.mode, state.stack
    if mode == "str":
        return _string(state, byte)
    if mode == "esc":
        if byte == ord("u"):
            return State("hex", stack, (state.aux, 4))
        return State("str", stack, (state.aux, 0)) if byte in _ESCAPES else None
    if mode == "hex":
        is_key, left = state.aux  # type: ignore[misc]
        if byte not in _HEX:
            return None
        return State("str", stack, (is_key, 0)) if left == 1 else State("hex", stack, (is_key, left - 1))
    if mode == "num":
        return _number(state, byte)
    if mode == "lit":
        rest: bytes = state.aux  # type: ignore[assignment]
        if byte != rest[0]:
            return None
        return State("lit", stack, rest[1:]) if len(rest) > 1 else _value_done(stack)
    if mode == "done":
        return None
    if byte == ord("\n"):
        return (
            state._replace(newlines=state.newlines + 1, spaces=0) if state.newlines < MAX_NEWLINES else None
        )
    if byte in WHITESPACE:
        return state._replace(spaces=state.spaces + 1) if state.spaces < MAX_WHITESPACE else None
    if mode == "start":
        return State("key_or_close", "{") if byte == ord("{") else None
    if mode in ("value", "value_or_close"):
        if mode == "value_or_close" and byte == ord("]"):
            return _value_done(stack[:-1])
        return _start_value(byte, stack)
    if mode in ("key_or_close", "key"):
        if byte == ord('"'):
            return State("str", stack, (True, 0))
        if mode == "key_or_close" and byte == ord("}"):
            return _value_done(stack[:-1])
        return None
    if mode == "colon":
        return State("value", stack) if byte == ord(":") else None
    # mode == "after": a value inside a container is complete
    if byte == ord(","):
        return State("key", stack) if stack[-1] == "{" else State("value", stack)
    if byte == ord("}" if stack[-1] == "{" else "]"):
        return _value_done(stack[:-1])
    return None


_CLOSERS = {"{": "}", "[": "]"}
# Bytes owed after the current value itself ends, by mode (the closing brackets come on top).
_PENDING = {
    "start": "{}",  # the empty object
    "done": "",
    "value": "0",
    "value_or_close": "",
    "key_or_close": "",
    "key": '"":0',
    "colon": ":0",
    "after": "",
}


def closing(state: State) -> bytes:
    """The shortest bytes that complete a JSON object from `state` (empty once it is complete)."""
    mode, aux = state.mode, state.aux
    close = "".join(_CLOSERS[c] for c in reversed(state.stack))
    if mode in _PENDING:
        return (_PENDING[mode] + close).encode()
    if mode == "num":
        return (("" if aux in _NUMBER_CAN_END else "0") + close).encode()
    if mode == "lit":
        return aux + close.encode()  # type: ignore[operator]
    if mode == "str":
        is_key, owed = aux  # type: ignore[misc]
        head = b"\x80" * owed  # continuation bytes finish a multi-byte character
    elif mode == "esc":
        is_key, head = aux, b"n"
    else:  # hex
        is_key, left = aux  # type: ignore[misc]
        head = b"0" * left
    return head + b'"' + (b":0" if is_key else b"") + close.encode()


def closing_length(state: State) -> int:
    """len(closing(state)), without building it: the walk asks this for every token."""
    mode, aux, depth = state.mode, state.aux, len(state.stack)
    if mode in _PENDING:
        return len(_PENDING[mode]) + depth
    if mode == "str":
        return aux[1] + (3 if aux[0] else 1) + depth  # type: ignore[index]
    if mode == "num":
        return (0 if aux in _NUMBER_CAN_END else 1) + depth
    if mode == "lit":
        return len(aux) + depth  # type: ignore[arg-type]
    if mode == "esc":
        return (4 if aux else 2) + depth
    return aux[1] + (3 if aux[0] else 1) + depth  # type: ignore[index]  # hex


def advance(state: State, data: bytes) -> State | None:
    for byte in data:
        next_state = step(state, byte)
        if next_state is None:
            return None
        state = next_state
    return state


INVALID = 255  # in a closing-length vector: the token breaks the grammar


class JsonGrammar:
    """Per-state token information for one vocabulary, cached by automaton state: for every token, how
    many bytes would be left to close the object after it (INVALID if it breaks the grammar)."""

    def __init__(self, token_bytes: list[bytes | None], cache_size: int = 1024) -> None:
        self.vocab_size = len(token_bytes)
        self.token_bytes = token_bytes
        # Special tokens (no bytes) and empty tokens are never allowed: they would not advance JSON.
        ordered = sorted((data, token) for token, data in enumerate(token_bytes) if data)
        self._tokens = [token for _, token in ordered]
        self._bytes = [data for data, _ in ordered]
        self._shared = [0] * len(ordered)  # bytes in common with the previous token in this order
        for i in range(1, len(ordered)):
            a, b = self._bytes[i - 1], self._bytes[i]
            common = 0
            for x, y in zip(a, b, strict=False):
                if x != y:
                    break
                common += 1
            self._shared[i] = common
        # Bytes per token (the loop bound keeps tokens that shorten the way to close by exactly that).
        self.token_lengths = torch.tensor(
            [min(len(data or b""), 255) for data in token_bytes], dtype=torch.int16
        )
        self._lengths: OrderedDict[State, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def closing_lengths(self, state: State) -> torch.Tensor:
        """uint8 [vocab]: closing_length of the state after each token, or INVALID."""
        lengths = self._lengths.get(state)
        if lengths is not None:
            self._lengths.move_to_end(state)
            return lengths
        tokens, closings = self._walk(state)
        lengths = torch.full((self.vocab_size,), INVALID, dtype=torch.uint8)
        lengths[tokens] = torch.tensor(closings, dtype=torch.uint8)
        self._lengths[state] = lengths
        if len(self._lengths) > self._cache_size:
            self._lengths.popitem(last=False)
        return lengths

    def allowed(self, state: State) -> torch.Tensor:
        """Boolean mask [vocab] of the tokens that can follow `state`."""
        return self.closing_lengths(state) != INVALID

    def _walk(self, start: State) -> tuple[list[int], list[int]]:
        allowed, closings = [], []
        states: list[State | None] = [start] + [None] * max(len(b) for b in self._bytes)
        failed_at = 1 << 30  # depth at which the previous token's path failed
        for token, data, shared in zip(self._tokens, self._bytes, self._shared, strict=True):
            if failed_at <= shared:  # starts with a prefix already known to fail
                continue
            failed_at = 1 << 30
            state = states[shared]
            for depth in range(shared, len(data)):
                state = step(state, data[depth])  # type: ignore[arg-type]
                if state is None:
                    failed_at = depth + 1
                    break
                states[depth + 1] = state
            else:
                allowed.append(token)
                # MAX_DEPTH keeps this far below INVALID.
                closings.append(closing_length(state))  # type: ignore[arg-type]
        return allowed, closings


_IN_STRING = frozenset({"str", "esc", "hex"})


class JsonConstraint:
    """One sequence's position in the grammar, and how it finishes (see the module's docstring)."""

    def __init__(self, grammar: JsonGrammar, *, finishing: bool = True) -> None:
        self.grammar = grammar
        self.state: State = START
        self.finishing = finishing
        self.cut_short = False  # the token budget took tokens away: the reply ends as "length"
        self._recent: list[int] = []  # the last tokens, for the loop bound
        # After a loop: close until the state is out of the string (-1) or shallower than this depth.
        self._close_below: int | None = None

    def mask(self, left: int | None = None) -> torch.Tensor:
        """The tokens allowed next, when `left` tokens (this one included) may still be generated."""
        lengths = self.grammar.closing_lengths(self.state)
        allowed = lengths != INVALID
        if not self.finishing:
            return allowed
        if left is not None and left <= INVALID:
            fits = allowed & (lengths < left)  # room left after this token for the way to close
            if fits.any():
                if not torch.equal(fits, allowed):
                    self.cut_short = True
                allowed = fits
        if self._must_close():
            # Only tokens on a shortest way to the end: each of their bytes shortens it by one.
            closer = allowed & (lengths.short() + self.grammar.token_lengths == closing_length(self.state))
            if closer.any():
                allowed = closer
        return allowed

    def _must_close(self) -> bool:
        in_string = self.state.mode in _IN_STRING
        if self._close_below is None and self._looping():
            self._close_below = -1 if in_string else len(self.state.stack)
        if self._close_below is not None:
            closed = not in_string if self._close_below < 0 else len(self.state.stack) < self._close_below
            if closed:
                self._close_below = None
        return self._close_below is not None

    def _looping(self) -> bool:
        """Do the last tokens repeat one unit at least LOOP_REPEATS times over at least LOOP_SPAN tokens?"""
        recent = self._recent
        for unit in range(1, MAX_LOOP_UNIT + 1):
            span = max(LOOP_SPAN, unit * LOOP_REPEATS)
            if span > len(recent):
                break
            tail = recent[-span:]
            if tail[unit:] == tail[:-unit]:
                return True
        return False

    def accept(self, token: int) -> None:
        data = self.grammar.token_bytes[token] or b""
        state = advance(self.state, data)
        if state is None:
            raise ValueError(f"token {token} breaks the JSON grammar")  # the mask rules this out
        self.state = state
        self._recent.append(token)
        del self._recent[: -MAX_LOOP_UNIT * LOOP_REPEATS]

    @property
    def complete(self) -> bool:
        return self.state.mode == "done"
