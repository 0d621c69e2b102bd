"""The character bigram baseline, worked by hand on a tiny text."""

from __future__ import annotations

import math

from tertulia.train.baseline import char_bigram_bits_per_byte


def test_add_one_bigram_bits_per_byte_by_hand() -> None:
    # Pairs counted: (start, a) twice, (a, b) three times, (b, a) once; the alphabet is a, b and "other".
    # P(a | start) = (2 + 1) / (2 + 3) and P(b | a) = (3 + 1) / (3 + 3), over the 2 bytes of "ab".
    expected = -(math.log2(3 / 5) + math.log2(4 / 6)) / 2
    assert math.isclose(char_bigram_bits_per_byte(["abab", "ab"], ["ab"]), expected, rel_tol=1e-12)


def test_unseen_characters_count_their_utf8_bytes() -> None:
    # "ñ" was never seen: P = 1 / (count(previous) + 3); it is two bytes of UTF-8.
    bits = char_bigram_bits_per_byte(["abab"], ["añ"])
    expected = -(math.log2((1 + 1) / (1 + 3)) + math.log2(1 / (2 + 3))) / 3
    assert math.isclose(bits, expected, rel_tol=1e-12)
