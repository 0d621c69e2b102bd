"""The floor a trained model must clear: a character bigram's bits per byte on the same held-out text.

Each character is predicted from the one before it (a document starts after a start symbol), with
add-one smoothing over the characters seen in training plus one for any other. Counted on the
training split, scored on the held-out split, divided by the held-out text's UTF-8 bytes: the same
denominator as a model's bits per byte.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

START = "\x02"  # not a character of any corpus here: a document's first character follows it
SHIFT = np.uint64(21)  # a code point fits in 21 bits: a pair is (previous << 21) | character


def _pairs(texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(previous characters, pair keys, UTF-8 bytes) of every document."""
    previous, keys, size = [], [], 0
    for text in texts:
        codes = np.frombuffer((START + text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        previous.append(codes[:-1])
        keys.append((codes[:-1] << SHIFT) | codes[1:])
        size += len(text.encode("utf-8"))
    empty = np.zeros(0, dtype=np.uint64)
    return (np.concatenate(previous) if previous else empty), (np.concatenate(keys) if keys else empty), size


def _count(values: np.ndarray, known: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """How often each of `values` occurs in the counted table (`known` sorted, with its `counts`)."""
    if not len(known):
        return np.zeros(len(values))
    at = np.minimum(np.searchsorted(known, values), len(known) - 1)
    return np.where(known[at] == values, counts[at], 0).astype(np.float64)


def char_bigram_bits_per_byte(train: Iterable[str], held_out: Iterable[str]) -> float:
    previous, keys, _ = _pairs(train)
    pairs, pair_counts = np.unique(keys, return_counts=True)
    contexts, context_counts = np.unique(previous, return_counts=True)
    alphabet = len(np.unique(keys & np.uint64((1 << 21) - 1))) + 1  # seen characters, and any other
    held_previous, held_keys, size = _pairs(held_out)
    probability = (_count(held_keys, pairs, pair_counts) + 1) / (
        _count(held_previous, contexts, context_counts) + alphabet
    )
    return float(-np.log2(probability).sum() / max(size, 1))
