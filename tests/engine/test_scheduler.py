"""The scheduler on its own, with no model: admission, chunking, preemption and abort are bookkeeping.

Sequences get made-up prompts and tokens; "running the model" is appending a token to a sequence.
"""

from __future__ import annotations

import pytest

from tertulia.engine.blocks import BLOCK_SIZE, BlockAllocator
from tertulia.engine.sampling import SamplingParams
from tertulia.engine.scheduler import PREFILL_CHUNK, Scheduler
from tertulia.engine.sequence import Sequence, Status

VOCAB = 64
TOKEN_BYTES: list[bytes | None] = [bytes([65 + i % 26]) for i in range(VOCAB)]


def scheduler(num_blocks: int = 64, max_batch: int = 4, prefix_cache: bool = False) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks), max_batch=max_batch, prefix_cache=prefix_cache)


def request(length: int, n: int = 1, first: int = 0) -> list[Sequence]:
    prompt = [(first + i) % VOCAB for i in range(length)]
    params = SamplingParams(temperature=0, n=n, max_tokens=1000, ignore_eos=True)
    return [Sequence(prompt, params, 1000, TOKEN_BYTES, VOCAB, index=i) for i in range(n)]


def added(s: Scheduler, *groups: list[Sequence]) -> list[list[Sequence]]:
    for group in groups:
        s.add(group)
    return list(groups)


def sample_first_tokens(s: Scheduler) -> None:
    """What the engine does with a plan's prefills, minus the model: every sampled sequence gets a token."""
    plan = s.schedule()
    for chunk in plan.prefills:
        for seq in chunk.sample_for:
            seq.output.append(1)
    s.release_finished()


def test_admission_stops_at_max_batch() -> None:
    s = scheduler(max_batch=3)
    pair, single, late = added(s, request(5, n=2), request(5, first=1), request(5, first=2))
    plan = s.schedule()
    assert [len(c.sample_for) for c in plan.prefills] == [2, 1]
    assert all(seq.status is Status.RUNNING for seq in pair + single)
    assert late[0].status is Status.WAITING and list(s.waiting) == [late]
    assert plan.decode == []  # nothing was running before this step's prefills


def test_admission_stops_at_the_kv_budget() -> None:
    s = scheduler(num_blocks=5, max_batch=4)
    # Three blocks each (40 positions): the second does not fit in the two left, whatever the batch.
    first, second = added(s, request(40), request(40, first=1))
    plan = s.schedule()
    assert len(plan.prefills) == 1 and plan.prefills[0].sample_for == first
    assert s.blocks.used == 3 and second[0].status is Status.WAITING and second[0].blocks == []


def test_n_choices_share_the_full_blocks_and_copy_the_last() -> None:
    s = scheduler()
    group = added(s, request(BLOCK_SIZE + 3, n=3))[0]
    [chunk] = s.schedule().prefills
    assert s.blocks.used == 2 + 2  # the prompt's two blocks once, plus a last block for each other choice
    assert all(seq.blocks[0] == group[0].blocks[0] for seq in group)
    assert chunk.copies == [(group[0].blocks[1], seq.blocks[1]) for seq in group[1:]]


def test_long_prompts_are_planned_in_fixed_chunks() -> None:
    s = scheduler(num_blocks=128)
    [seq] = added(s, request(2 * PREFILL_CHUNK + 7))[0]
    spans = []
    for _ in range(3):
        spans += [(c.start, c.end, len(c.sample_for)) for c in s.schedule().prefills]
    assert spans == [
        (0, PREFILL_CHUNK, 0),
        (PREFILL_CHUNK, 2 * PREFILL_CHUNK, 0),
        (2 * PREFILL_CHUNK, 2 * PREFILL_CHUNK + 7, 1),
    ]
    assert seq.status is Status.RUNNING and s.prefilling is None


def test_decode_plans_the_sequences_running_before_the_step() -> None:
    s = scheduler()
    [old] = added(s, request(5))[0]
    sample_first_tokens(s)
    [new] = added(s, request(5, first=1))[0]
    plan = s.schedule()
    assert plan.decode == [old] and [c.sample_for for c in plan.prefills] == [[new]]
    batch = s.decode_batch(plan.decode)
    assert batch is not None
    assert (batch.sequences, batch.tokens, batch.positions) == ([old], [1], [5])


def test_preemption_takes_the_newest_admitted() -> None:
    s = scheduler(num_blocks=3, max_batch=3)
    older, newer = (g[0] for g in added(s, request(BLOCK_SIZE), request(BLOCK_SIZE, first=1)))
    sample_first_tokens(s)  # both fill their one block; the next position needs a second each
    assert s.blocks.used == 2
    batch = s.decode_batch(s.schedule().decode)
    assert batch is not None and batch.sequences == [older]
    assert len(older.blocks) == 2 and s.preemptions == 1
    # The newer one gave its block back and waits first in line, to be recomputed.
    assert newer.status is Status.WAITING and newer.blocks == [] and s.waiting[0] == [newer]
    assert s.running == [older]


def test_abort_frees_blocks_of_running_and_waiting_sequences() -> None:
    s = scheduler(num_blocks=8, max_batch=2)
    running, waiting = added(s, request(20, n=2), request(5, first=1))
    sample_first_tokens(s)
    assert s.blocks.used == 3 and waiting[0].status is Status.WAITING
    s.abort(running)
    assert s.blocks.used == 0 and all(seq.blocks == [] for seq in running)
    assert s.running == [] and all(seq.finish_reason == "abort" for seq in running)
    s.abort(waiting)
    assert not s.has_work and s.idle


def test_abort_while_prefilling_frees_the_blocks_at_the_next_plan() -> None:
    s = scheduler(num_blocks=128)
    group = added(s, request(PREFILL_CHUNK + 5, n=2))[0]
    s.schedule()
    assert s.prefilling == group and s.blocks.used > 0
    s.abort(group)
    assert s.schedule().prefills == []
    assert s.prefilling is None and s.idle


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_a_cached_prompt_start_is_found_by_the_next_admission(prefix_cache: bool) -> None:
    s = scheduler(prefix_cache=prefix_cache)
    added(s, request(3 * BLOCK_SIZE + 1))
    sample_first_tokens(s)
    [again] = added(s, request(3 * BLOCK_SIZE + 1))[0]
    [chunk] = s.schedule().prefills
    expected_start = 3 * BLOCK_SIZE if prefix_cache else 0
    assert chunk.start == expected_start and s.blocks.hits == (3 if prefix_cache else 0)
    assert again.status is Status.RUNNING
