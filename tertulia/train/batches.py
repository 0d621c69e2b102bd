"""Examples as token ids with assistant-only targets, and length-bucketed batches with little padding.

The model learns only what the assistant says (and where it stops): system and user text, the chat
template's markup and turns with `weight: 0` are context, never targets. Batches group examples of
similar length under a token budget, so almost nothing is padding; every batch is right-padded, so a
plain causal mask is exact (real tokens never see the padding after them).

Examples that begin alike (the same system prompt, the template's opening) are batched together and
their common beginning is computed once per batch, its keys and values shared by every row: the
gradient is the same as computing it row by row, for a fraction of the work.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from tertulia.models.chat_template import ChatTemplate

T = TypeVar("T")
IGNORE = -100  # the target of a position that is not trained on (PyTorch's cross-entropy default)


@dataclass
class TokenizedExample:
    ids: list[int]
    trained: list[bool]  # trained[t]: ids[t] is an assistant token the model must predict

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def target_count(self) -> int:
        return sum(self.trained[1:])

    @property
    def context_lead(self) -> int:
        """Leading tokens whose hidden states no target needs: at most this much can be shared."""
        first = next((t for t, trained in enumerate(self.trained) if trained), len(self.ids))
        return max(0, first - 1)


def tokenize(
    messages: list[dict[str, Any]], template: ChatTemplate, eos_ids: Sequence[int]
) -> TokenizedExample:
    """The conversation as the model sees it, with each trained assistant turn marked up to its end token."""
    return TokenizedExample(*template.encode_marked(messages, eos_ids))


def bucket(lengths: Sequence[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped into batches of similar length, each at most `batch_tokens` once padded.

    Sorting by length (ties broken at random, so epochs differ) then cutting greedily keeps padding to
    a few percent; the batches are then shuffled so the order of lengths is not learnt.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted ascending, so the newest example is the longest of its batch.
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


BatchPlan = tuple[int, list[int]]  # (leading tokens every row shares, example indices)
MIN_SHARED = 8  # sharing fewer leading tokens saves less than the second forward call costs


def _common(a: TokenizedExample, b: TokenizedExample) -> int:
    limit = min(a.context_lead, b.context_lead)
    for n in range(limit):
        if a.ids[n] != b.ids[n]:
            return n
    return limit


def prefix_groups(
    examples: Sequence[TokenizedExample], min_shared: int = MIN_SHARED
) -> list[tuple[int, list[int]]]:
    """(shared leading tokens, members) groups (0 shared for an example alone).

    Sorted by their tokens, examples that begin alike are neighbours, and a group's common prefix is
    the least one between neighbours. A neighbour joins if it shares at least `min_shared` tokens and
    at least half of what the group shares so far (so one stray example does not undo the sharing).
    """
    order = sorted(range(len(examples)), key=lambda i: examples[i].ids)
    groups: list[tuple[int, list[int]]] = []
    members: list[int] = []
    shared = 0
    for index in order:
        if members:
            common = _common(examples[members[-1]], examples[index])
            if common >= min_shared and (len(members) == 1 or common >= shared // 2):
                shared = common if len(members) == 1 else min(shared, common)
                members.append(index)
                continue
            groups.append((shared if len(members) > 1 else 0, members))
        members, shared = [index], 0
    if members:
        groups.append((shared if len(members) > 1 else 0, members))
    return groups


def plan(
    examples: Sequence[TokenizedExample], batch_tokens: int, rng: random.Random
) -> list[tuple[int, list[int]]]:
    """Batches as (shared prefix length, example indices), in a seeded random order.

    Within a group the budget counts what is computed per row (the tokens after the shared prefix).
    """
    batches: list[BatchPlan] = []
    # Text with no untrained lead (pretraining's windows) has nothing to share: skip the sort.
    sharing = any(e.context_lead >= MIN_SHARED for e in examples)
    groups = prefix_groups(examples) if sharing else [(0, list(range(len(examples))))]
    for shared, members in groups:
        lengths = [len(examples[i]) - shared for i in members]
        for chunk in bucket(lengths, batch_tokens, rng):
            batches.append((shared if len(chunk) > 1 else 0, [members[j] for j in chunk]))
    rng.shuffle(batches)
    return batches


def for_rank(batches: list[T], rank: int, world: int) -> list[T]:
    """This process's share; every process gets the same count (the shortest shares repeat a batch),
    because data-parallel training needs each process to take every step."""
    if world == 1:
        return batches
    per_rank = -(-len(batches) // world)
    padded = [batches[i % len(batches)] for i in range(per_rank * world)]  # fewer batches than processes too
    return padded[rank::world]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, length]: each row after the shared prefix
    targets: torch.Tensor  # [rows, length]: the next token where it is trained on, else IGNORE
    prefix: torch.Tensor | None  # [shared]: the leading tokens every row has, computed once
    tokens: int  # real tokens of the examples (the shared prefix counted in every row, no padding)
    target_count: int

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The forward arguments (input_ids, targets, prefix) on `device`."""
        prefix = self.prefix.to(device) if self.prefix is not None else None
        return self.input_ids.to(device), self.targets.to(device), prefix

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel() + (len(self.prefix) if self.prefix is not None else 0)


def collate(examples: Sequence[TokenizedExample], pad_id: int, shared: int = 0) -> Batch:
    length = max(len(e) for e in examples) - shared
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.ids)
        trained = torch.tensor(example.trained[1:], dtype=torch.bool)
        following = torch.where(trained, ids[1:], IGNORE)
        input_ids[row, : len(ids) - shared] = ids[shared:]
        targets[row, : len(ids) - 1 - shared] = following[shared:]
    return Batch(
        input_ids,
        targets,
        torch.tensor(examples[0].ids[:shared]) if shared else None,
        sum(len(e) for e in examples),
        sum(e.target_count for e in examples),
    )
