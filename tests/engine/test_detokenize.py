"""Streaming detokenization with the real byte-level BPE tokenizer, and stop strings across pieces."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tertulia.engine.detokenize import IncrementalDetokenizer, StopMatcher
from tertulia.models.tokenizer import Tokenizer

TEXTS = [
    "👍🏽",
    "🇪🇸",
    "👨‍👩‍👧",
    "¿Qué tal? ñandú",
    "日本語のテキスト",
    "Hola 👋🏻 ¿qué tal? 日本語 and 한국어, naïve café — “quotes” 🇪🇸🇯🇵!",
    "mañana\n\n  código:\tλx. x ≠ 0 ✓",
    "plain ASCII text, nothing special.",
]


def encodable_bytes(tokenizer: Tokenizer) -> set[int]:
    """Bytes that some token holds on its own."""
    return {piece[0] for piece in tokenizer.token_bytes if piece is not None and len(piece) == 1}


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The pieces emitted token by token, then the final flush."""
    detokenizer = IncrementalDetokenizer(tokenizer.token_bytes)
    return [detokenizer.add(token) for token in ids] + [detokenizer.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_whole_characters_and_round_trip(real_tokenizer: Tokenizer, text: str) -> None:
    ids = real_tokenizer.encode(text)
    pieces = stream(real_tokenizer, ids)
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # no lone surrogates
    assert "".join(pieces) == text


def test_multibyte_characters_really_are_split_across_tokens(real_tokenizer: Tokenizer) -> None:
    """The emoji tests above would be vacuous if each emoji were one token: check they are not."""
    ids = real_tokenizer.encode("👍🏽")
    pieces = stream(real_tokenizer, ids)
    assert len(ids) > 2
    assert pieces.count("") >= len(ids) - 2  # most tokens complete no character
    assert [p for p in pieces if p] == ["👍", "🏽"]


def test_special_tokens_produce_no_text(real_tokenizer: Tokenizer) -> None:
    ids = real_tokenizer.encode("<|im_start|>user\nhi<|im_end|>", allow_special=True)
    assert real_tokenizer.eos_id in ids
    assert "".join(stream(real_tokenizer, ids)) == "user\nhi"


def test_crafted_byte_table() -> None:
    table: list[bytes | None] = [b"\xf0\x9f", b"\x91\x8d", None, b"a\xc3", b"\xb1b"]
    detokenizer = IncrementalDetokenizer(table)
    assert detokenizer.add(0) == ""
    assert detokenizer.add(2) == ""  # a special token in the middle of a character changes nothing
    assert detokenizer.add(1) == "👍"
    assert detokenizer.add(3) == "a"
    assert detokenizer.add(4) == "ñb"
    assert detokenizer.add(99) == "" and detokenizer.add(-1) == ""  # ids outside the table
    assert detokenizer.flush() == ""


def test_flush_replaces_a_cut_off_character() -> None:
    detokenizer = IncrementalDetokenizer([b"ok", b"\xf0\x9f\x91"])
    assert detokenizer.add(0) == "ok"
    assert detokenizer.add(1) == ""
    assert detokenizer.flush() == "\ufffd"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_any_text_round_trips_token_by_token(real_tokenizer: Tokenizer, text: str) -> None:
    # SmolLM2's vocabulary has no token for a few bytes (0x04, 0xf1, 0xff, ...), so the tokenizer drops
    # characters made of them (e.g. U+40000): those cannot round-trip whatever the detokenizer does.
    encodable = encodable_bytes(real_tokenizer)
    text = "".join(c for c in text if set(c.encode()) <= encodable)
    pieces = stream(real_tokenizer, real_tokenizer.encode(text))
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in piece for piece in pieces)


# --- stop strings ---------------------------------------------------------------------------------


def run(matcher: StopMatcher, pieces: list[str]) -> list[str]:
    return [matcher.push(piece) for piece in pieces] + [matcher.flush()]


def test_stop_string_spanning_several_pushes_is_removed() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("Hello ST") == "Hello "
    assert matcher.push("O") == ""
    assert not matcher.stopped
    assert matcher.push("P and more") == ""
    assert matcher.stopped
    assert matcher.push("later text") == ""
    assert matcher.flush() == ""


def test_text_before_the_stop_in_the_same_push_is_emitted() -> None:
    matcher = StopMatcher(["</s>"])
    assert matcher.push("answer</s>ignored") == "answer"
    assert matcher.stopped


def test_stop_at_the_very_start() -> None:
    assert run(StopMatcher(["Hi"]), ["Hi there"]) == ["", ""]


def test_held_prefix_is_released_when_it_is_not_a_stop() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("Hello ST") == "Hello "
    assert matcher.push("AR") == "STAR"
    assert matcher.push("S") == ""  # could still begin "STOP"
    assert matcher.push("!") == "S!"
    assert not matcher.stopped


def test_flush_releases_held_text_at_the_end() -> None:
    matcher = StopMatcher(["\n\nUser:"])
    assert matcher.push("Sure.\n") == "Sure."
    assert matcher.push("\nUs") == ""
    assert matcher.flush() == "\n\nUs"
    assert not matcher.stopped


def test_held_text_is_the_longest_possible_prefix() -> None:
    # "aab": the suffix "aa" could still become "aab", so both a's are held.
    matcher = StopMatcher(["aab"])
    assert matcher.push("xaa") == "x"
    assert matcher.push("a") == "a"  # "aaa": only the last two can still start "aab"
    assert matcher.push("b") == ""
    assert matcher.stopped


def test_multiple_stops_pick_the_earliest_occurrence() -> None:
    for stops in (["world", "lo"], ["lo", "world"]):
        assert run(StopMatcher(stops), ["hello world"]) == ["hel", ""]
    assert "".join(run(StopMatcher(["END", "\n\n"]), ["one\n", "\ntwo END"])) == "one"
    assert "".join(run(StopMatcher(["END", "\n\n"]), ["one E", "ND\n\n"])) == "one "


def test_held_text_for_several_stops() -> None:
    matcher = StopMatcher(["abc", "bcd"])
    assert matcher.push("xab") == "x"  # "ab" may start "abc"
    assert matcher.push("cz") == ""
    assert matcher.stopped


def test_no_stops_passes_text_through() -> None:
    matcher = StopMatcher([])
    assert matcher.push("anything STOP at all") == "anything STOP at all"
    assert matcher.flush() == ""
    assert StopMatcher([""]).push("text") == "text"  # empty stop strings are ignored


def test_empty_push_emits_nothing() -> None:
    matcher = StopMatcher(["x"])
    assert matcher.push("") == ""
    assert not matcher.stopped


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_stream_of_pieces_is_cut_at_the_first_stop(data: st.DataObject) -> None:
    alphabet = st.sampled_from("ab c\nñ👍")  # few letters, so stops and partial matches are frequent
    text = data.draw(st.text(alphabet=alphabet, max_size=40), label="text")
    if text and data.draw(st.booleans(), label="stop from text"):
        start = data.draw(st.integers(0, len(text) - 1), label="start")
        end = data.draw(st.integers(start + 1, min(len(text), start + 6)), label="end")
        stop = text[start:end]
    else:
        stop = data.draw(st.text(alphabet=alphabet, min_size=1, max_size=5), label="stop")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10), label="cuts"))
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    matcher = StopMatcher([stop])
    emitted = "".join(run(matcher, pieces))
    position = text.find(stop)
    assert emitted == (text if position < 0 else text[:position])
    assert matcher.stopped == (position >= 0)
