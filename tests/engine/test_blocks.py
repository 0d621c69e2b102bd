"""The KV-cache block allocator: handing out, sharing and releasing blocks, and the prefix cache."""

from __future__ import annotations

import random

import pytest

from tertulia.engine.blocks import BLOCK_SIZE, BlockAllocator, OutOfBlocks

BS = 4  # a small block size keeps prompts short
P = list(range(100, 110))  # a prompt of two full blocks and a partial third one


def computed(alloc: BlockAllocator, tokens: list[int]) -> list[int]:
    """Blocks for a freshly computed prompt, registered in the prefix cache."""
    blocks = [alloc.allocate() for _ in range(alloc.blocks_for(len(tokens)))]
    alloc.register(tokens, blocks)
    return blocks


def drain(alloc: BlockAllocator) -> list[int]:
    """Every block the allocator can still hand out, until it is full."""
    out: list[int] = []
    with pytest.raises(OutOfBlocks):
        while True:
            out.append(alloc.allocate())
    return out


def test_defaults_and_blocks_for() -> None:
    alloc = BlockAllocator(3)
    assert alloc.block_size == BLOCK_SIZE
    assert (alloc.available, alloc.used) == (3, 0)
    assert [alloc.blocks_for(n) for n in (0, 1, BLOCK_SIZE, BLOCK_SIZE + 1)] == [0, 1, 1, 2]


def test_allocate_hands_out_lowest_free_block_first() -> None:
    alloc = BlockAllocator(6, BS)
    assert [alloc.allocate() for _ in range(4)] == [0, 1, 2, 3]
    alloc.release([2, 0])
    assert alloc.allocate() == 0
    assert alloc.allocate() == 2
    assert alloc.allocate() == 4


def test_allocate_after_prefers_the_next_block() -> None:
    alloc = BlockAllocator(8, BS)
    assert alloc.allocate() == 0
    assert alloc.allocate(after=0) == 1
    assert alloc.allocate(after=5) == 6
    assert alloc.allocate(after=6) == 7
    assert alloc.allocate(after=7) == 2  # past the end: the lowest free one
    assert alloc.allocate(after=0) == 3  # 1 is taken: the lowest free one
    assert (alloc.available, alloc.used) == (2, 6)


def test_out_of_order_blocks_are_counted_once_and_handed_out_once() -> None:
    alloc = BlockAllocator(6, BS)
    for _ in range(5):  # the heap collects stale entries for blocks 3 and 4
        a, b = alloc.allocate(after=2), alloc.allocate(after=3)
        assert (a, b) == (3, 4)
        assert (alloc.available, alloc.used) == (4, 2)
        alloc.release([a, b])
        assert (alloc.available, alloc.used) == (6, 0)
    assert drain(alloc) == [0, 1, 2, 3, 4, 5]
    assert (alloc.available, alloc.used) == (0, 6)
    alloc.release(range(6))
    assert (alloc.available, alloc.used) == (6, 0)
    assert drain(alloc) == [0, 1, 2, 3, 4, 5]


def test_counts_match_a_model_over_random_cycles() -> None:
    rng, n = random.Random(0), 8
    alloc, refs = BlockAllocator(n, BS), [0] * n
    for _ in range(2000):
        held = [b for b in range(n) if refs[b]]
        op = rng.random()
        if op < 0.45 and len(held) < n:
            block = alloc.allocate(after=rng.choice([None, *range(n)]))
            assert refs[block] == 0, "handed out a block that is still held"
            refs[block] = 1
        elif op < 0.6 and held:
            refs[alloc.share(rng.choice(held))] += 1
        elif held:
            block = rng.choice(held)
            alloc.release([block])
            refs[block] -= 1
        free = sum(1 for r in refs if r == 0)
        assert (alloc.available, alloc.used) == (free, n - free)
    alloc.release([b for b in range(n) for _ in range(refs[b])])
    assert sorted(drain(alloc)) == list(range(n))


def test_out_of_blocks_when_nothing_is_free_or_evictable() -> None:
    alloc = BlockAllocator(2, BS)
    alloc.allocate(), alloc.allocate()
    with pytest.raises(OutOfBlocks):
        alloc.allocate()
    with pytest.raises(OutOfBlocks):
        alloc.allocate(after=0)
    alloc.release([1])
    assert alloc.allocate(after=0) == 1


def test_a_shared_block_is_freed_by_its_last_holder() -> None:
    alloc = BlockAllocator(3, BS)
    block = alloc.allocate()
    assert alloc.share(block) == block
    alloc.share(block)
    alloc.release([block])
    alloc.release([block])
    assert (alloc.used, alloc.allocate()) == (1, 1)  # block 0 is still held
    alloc.release([block])
    assert (alloc.used, alloc.allocate()) == (1, 0)


def test_lookup_finds_the_longest_cached_prefix_of_whole_blocks() -> None:
    alloc = BlockAllocator(16, BS)
    blocks = computed(alloc, P)
    assert len(blocks) == 3
    assert alloc.lookup(P) == blocks[:2]  # the partial third block is not cached
    assert alloc.lookup(P[:8] + [1, 2, 3, 4, 5]) == blocks[:2]
    assert alloc.lookup(P[:6] + [1, 2, 3, 4, 5]) == blocks[:1]
    assert alloc.lookup(P[:9]) == blocks[:2]
    assert alloc.lookup(P[:8]) == blocks[:1]  # exactly two full blocks: the last token stays uncovered
    assert alloc.lookup(P[:4]) == []
    assert alloc.lookup([1, *P[1:]]) == []  # differs in the first block
    assert alloc.lookup([1, 2, 3, 4, *P[4:]]) == []  # block 2's tokens, but after another block 1
    alloc.release(blocks)  # the allocating holder leaves; the five lookups still hold theirs
    assert alloc.used == 2
    alloc.release(blocks[:2] * 3 + blocks[:1] * 2)
    assert alloc.used == 0


def test_released_registered_blocks_are_evictable_and_found_again() -> None:
    alloc = BlockAllocator(5, BS)
    blocks = computed(alloc, P)
    alloc.release(blocks)
    assert (alloc.available, alloc.used) == (5, 0)
    again = alloc.lookup(P)
    assert again == blocks[:2]
    assert (alloc.available, alloc.used) == (3, 2)
    alloc.release(again)
    # new data goes to the free blocks first: the partial third block and the two never used
    assert [alloc.allocate() for _ in range(3)] == [2, 3, 4]
    assert alloc.lookup(P) == blocks[:2]


def test_eviction_takes_the_least_recently_used_block() -> None:
    alloc = BlockAllocator(3, BS)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    alloc.release(computed(alloc, a))  # block 0
    alloc.release(computed(alloc, b))  # block 1, released later
    alloc.release(alloc.lookup([*a, 9]))  # block 0 is now the most recently used
    assert alloc.allocate() == 2
    assert alloc.allocate() == 1  # evicts b
    assert alloc.lookup([*b, 9]) == []
    assert alloc.lookup([*a, 9]) == [0]


def test_an_evicted_block_takes_the_chain_after_it_along() -> None:
    alloc = BlockAllocator(3, BS)
    first, second, third = computed(alloc, P)
    alloc.release([first, second, third])  # third (not cached) is freed; first then second evictable
    assert alloc.allocate() == third
    assert alloc.allocate() == first  # evicts the least recently released
    assert alloc.lookup(P) == []
    assert alloc.available == 1  # second keeps its contents, though nothing can reach it
    alloc.release([first])
    assert computed(alloc, P[:5]) == [first, second]  # block 1 again, into the same block; evicts second
    alloc.release([first, second])
    assert alloc.lookup(P) == [first]  # the old second block is not taken for block 2


def test_a_recomputed_first_block_does_not_revive_the_old_chain() -> None:
    alloc = BlockAllocator(4, BS)
    first, second, third = computed(alloc, P)
    alloc.release([first, second, third])
    held = [alloc.allocate() for _ in range(3)]  # free 2 and 3, then evicts first
    assert held == [2, 3, first]
    alloc.release([first])  # now free, no longer cached
    assert computed(alloc, P[:4]) == [first]  # the same tokens, a new identity
    assert alloc.lookup(P) == [first]  # second is still cached, but chained to the evicted content
    assert alloc.available == 1  # only second, evictable


def test_the_same_content_registered_twice_keeps_the_first_block() -> None:
    alloc = BlockAllocator(4, BS)
    one = computed(alloc, P[:5])
    two = computed(alloc, P[:5])  # the same prompt computed concurrently by another sequence
    assert (one, two) == ([0, 1], [2, 3])
    alloc.release(two)  # the duplicate is not cached: freed, not evictable
    assert (alloc.available, alloc.used) == (2, 2)
    alloc.release(one)
    assert (alloc.available, alloc.used) == (4, 0)
    assert alloc.lookup(P[:5]) == [0]
    assert [alloc.allocate() for _ in range(3)] == [1, 2, 3]  # all free: nothing evicted
    with pytest.raises(OutOfBlocks):
        alloc.allocate()  # block 0 is held by the lookup
