"""The scheduler on plain state: no model, no tensors. A tiny driver plays the engine's part
(computed tokens advance; a sequence whose chunk reaches its end gets one new token)."""

from __future__ import annotations

from kunlite.config import SchedulerConfig
from kunlite.engine.block_manager import BlockManager
from kunlite.engine.preemption import RecomputePolicy
from kunlite.engine.scheduler import Scheduler, SchedulerOutput
from kunlite.engine.sequence import Sequence, SeqStatus
from kunlite.sampling_params import SamplingParams

PS = 4


def make(blocks: int, budget: int = 16, max_seqs: int = 8, chunked: bool = True, **kw) -> Scheduler:
    kv = BlockManager(page_size=PS, layers_per_block=2, pages=range(2 * blocks))
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=min(budget, 64),
                          enable_chunked_prefill=chunked)
    return Scheduler(cfg, kv, RecomputePolicy(), **kw)


def seq(name: str, n_prompt: int, t: float = 0.0, priority: int = 0, n: int = 1) -> Sequence:
    base = 1000 * (1 + sum(map(ord, name)))  # distinct prompts: no accidental prefix-cache hits
    return Sequence(seq_id=name, request_id=name, index=0, prompt_token_ids=list(range(base, base + n_prompt)),
                    params=SamplingParams(n=n), arrival_time=t, priority=priority, pending_children=n - 1)


def run_step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    s.fork_children(out)
    for q, n in out.scheduled:
        q.num_computed_tokens += n
        if q.num_computed_tokens == q.num_tokens:
            q.append_token(7)
    s.kv.check()
    return out


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(q.seq_id, n) for q, n in out.scheduled]


def test_chunked_prefill_shares_steps_with_decodes_under_the_budget() -> None:
    s = make(blocks=32, budget=16)
    s.add(seq("a", 10))
    s.add(seq("b", 30))
    assert plan(run_step(s)) == [("a", 10), ("b", 6)]
    assert plan(run_step(s)) == [("a", 1), ("b", 15)]  # a decodes, b continues its prefill
    assert plan(run_step(s)) == [("a", 1), ("b", 9)]
    assert plan(run_step(s)) == [("a", 1), ("b", 1)]  # both decoding
    assert s.kv.tables["b"] == list(range(3, 3 + 8))  # exact blocks: a took 0..2, then b's


def test_without_chunking_a_prompt_waits_for_a_step_with_room() -> None:
    s = make(blocks=32, budget=32, chunked=False)
    s.add(seq("a", 20))
    s.add(seq("b", 20))
    assert plan(run_step(s)) == [("a", 20)]
    assert plan(run_step(s)) == [("a", 1), ("b", 20)]


def test_decodes_come_first_in_the_batch() -> None:
    s = make(blocks=32, budget=64)
    s.add(seq("a", 8))
    run_step(s)
    s.add(seq("b", 8))
    out = s.schedule()
    assert plan(out) == [("a", 1), ("b", 8)] and out.num_decodes == 1


def test_max_num_seqs_caps_the_running_set() -> None:
    s = make(blocks=32, budget=64, max_seqs=2)
    for name in "abc":
        s.add(seq(name, 3))
    assert [q for q, _ in plan(run_step(s))] == ["a", "b"]
    assert [q.seq_id for q in s.waiting] == ["c"]


def test_preemption_takes_the_latest_and_requeues_it_first() -> None:
    s = make(blocks=5, budget=64)  # 20 token slots
    s.add(seq("a", 8, t=0))
    s.add(seq("b", 8, t=1))
    run_step(s)  # a: 2 blocks, b: 2 blocks, 1 free
    s.add(seq("c", 4, t=2))
    # a grows to 9 tokens and takes the last free block; b then needs a block: b (the latest
    # running) is preempted, and c is not admitted in a step that preempted.
    out = run_step(s)
    assert plan(out) == [("a", 1)]
    assert [q.seq_id for q in out.preempted] == ["b"]
    b = out.preempted[0]
    assert b.status is SeqStatus.WAITING and b.num_computed_tokens == 0 and "b" not in s.kv.tables
    assert [q.seq_id for q in s.waiting] == ["b", "c"]
    assert s.num_preemptions == 1


def test_recompute_brings_back_the_preempted_tokens_from_the_prefix_cache() -> None:
    s = make(blocks=6, budget=64)
    s.add(seq("a", 8, t=0))
    s.add(seq("b", 9, t=1))
    run_step(s)
    s.finish(s.running[0], "stop")  # a leaves: its blocks stay cached but free
    out = s.schedule()
    assert plan(out) == [("b", 1)]
    b = s.running[0]
    s.running.remove(b)
    s.policy.preempt(b, s.kv)
    s._enqueue(b, front=True)
    out = s.schedule()
    # b's tokens are prompt (9) + 1 output; its first 2 full blocks (8 tokens) hit the cache.
    assert plan(out) == [("b", 2)] and b.num_computed_tokens == 8


def test_priority_order_admits_the_most_urgent_first() -> None:
    s = make(blocks=32, budget=8, priority_order=True)
    s.add(seq("low", 8, t=0, priority=5))
    s.add(seq("high", 8, t=1, priority=-1))
    assert plan(run_step(s)) == [("high", 8)]


def test_n_greater_than_one_forks_after_the_prompt() -> None:
    s = make(blocks=32, budget=64)
    s.add(seq("p", 6, n=3))
    out = s.schedule()
    pairs = s.fork_children(out)
    assert [c.seq_id for _, c in pairs] == ["p#1", "p#2"]
    assert len(out.block_copies) == 2  # 6 tokens: one full block shared, the partial one copied
    tables = s.kv.tables
    assert tables["p#1"][0] == tables["p#2"][0] == tables["p"][0]
    assert len({tables["p"][1], tables["p#1"][1], tables["p#2"][1]}) == 3
    assert all(c.num_computed_tokens == 6 and c.status is SeqStatus.RUNNING for _, c in pairs)
    assert pairs[0][1].params.seed is None


def test_finish_frees_blocks_and_forgets_waiting_sequences() -> None:
    s = make(blocks=8, budget=8)
    s.add(seq("a", 12))
    s.add(seq("b", 4))
    run_step(s)  # a gets 8 tokens of its prompt
    s.finish(s.running[0], "abort")
    s.finish(s.waiting[0], "abort")
    assert s.kv.num_used_blocks == 0 and not s.has_unfinished
    s.kv.check()
