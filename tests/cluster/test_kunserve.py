"""The parameter-centric policy on a 2-worker CPU cluster over gloo (tiny models): a burst drops
replicated parameters into KV, the in-flight requests' KV is exchanged (or they stall, or are
recomputed), calm restores two replicas; the greedy tokens are those of an undisturbed run and
KV accounting is exact on both devices afterwards."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from clusterkit import PROMPTS, SCARCE, assert_nothing_held, cluster, drain, reference, submit, tokens

from kunlite.engine.messages import RequestOutput
from kunlite.sampling_params import SamplingParams
from tiny_models import make_tiny_model

MODES = ["stall", "remote-attention", "recompute"]


def run_until_replicas(c, timeout_s: float = 120.0) -> dict[str, list[RequestOutput]]:  # type: ignore[no-untyped-def]
    """Step until every request is done and the cluster is two replicas again; every state it
    went through is recorded on the cluster object for the test."""
    outs: dict[str, list[RequestOutput]] = {}
    c.seen_states = set()
    deadline = time.monotonic() + timeout_s
    while c.has_unfinished or set(c.states.values()) != {"serving"} or len(c.states) != 2:
        assert time.monotonic() < deadline, f"stuck in {c.states}: " + "; ".join(
            f"{i.id}: " + ", ".join(f"{s.seq_id} {s.status.value} paused={s.paused} in_flight={s.in_flight} "
                                    f"{s.num_computed_tokens}/{s.num_tokens}"
                                    for s in i.scheduler.running + i.scheduler.waiting) for i in c.instances.values())
        for o in c.step(0.2):
            outs.setdefault(o.request_id, []).append(o)
        c.seen_states |= set(c.states.values())
    return outs


@pytest.mark.parametrize("mode", MODES)
def test_a_burst_drops_exchanges_and_calm_restores_two_replicas(tiny: Path, mode: str) -> None:
    want = reference(tiny)
    with cluster(tiny, overload_policy="kunserve", exchange=mode, device_memory=SCARCE, calm_window=0.3) as c:
        capacity = c.kv_capacity_tokens
        submit(c, PROMPTS, instance=0)  # instance 0 is throttled at once: more prompt than KV
        outs = run_until_replicas(c)
        assert tokens(outs) == want
        stats = c.stats()
        assert stats.num_drops_total == 1 and stats.num_restores_total == 1
        assert "exchanging" in c.seen_states or "pipeline" in c.seen_states
        if mode == "remote-attention":
            assert stats.remote_attention_calls_total > 0 and stats.exchanged_bytes_total > 0
        elif mode == "stall":
            assert stats.remote_attention_calls_total == 0 and stats.exchanged_bytes_total > 0
        else:
            assert stats.exchanged_bytes_total == 0 and stats.num_preemptions_total > 0  # recomputed
        assert {e.kind for e in c.take_events()} >= {"drop", "restore"}
        # Two replicas again, each holding every layer, with their whole KV back.
        assert [[m.layers for m in i.members] for i in c.instances.values()] == [[(0, 3)], [(0, 3)]]
        assert sum(i.kv.num_total_blocks for i in c.instances.values()) * 4 == capacity
        assert_nothing_held(c)


def test_the_merged_group_has_more_kv_than_both_replicas_and_admits_the_queue(tiny_root: Path) -> None:
    """Right after the drop, the pipeline holds more KV tokens than the two replicas did
    together (the parameters that stopped being duplicates), and the queue drains into it."""
    heavy = make_tiny_model(tiny_root, "llama-4l-heavy")
    with cluster(heavy, overload_policy="kunserve", exchange="stall", device_memory="3700KiB", calm_window=60) as c:
        replicas = sum(i.kv.num_total_blocks for i in c.instances.values())
        submit(c, PROMPTS, instance=0)
        deadline = time.monotonic() + 30
        while len(c.instances) != 1:
            assert time.monotonic() < deadline
            c.step(0.2)
        group = c.instances[0]
        assert [m.layers for m in group.members] == [(0, 2), (2, 4)]
        assert group.kv.num_total_blocks > 1.5 * replicas, (group.kv.num_total_blocks, replicas)
        while group.scheduler.waiting:  # the queue drains into the freed pages
            assert time.monotonic() < deadline
            c.step(0.2)
        drain(c)
        assert_nothing_held(c)


@pytest.mark.parametrize("mode", MODES)
def test_a_drop_in_the_middle_of_prefill_chunks(tiny: Path, mode: str) -> None:
    """Long prompts under a small token budget: one is half prefilled when the replicas merge;
    it finishes in the pipeline with the undisturbed tokens."""
    prompts = [[(11 * i + j) % 150 + 3 for j in range(60 + 7 * i)] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = reference(tiny, prompts, params)
    with cluster(tiny, overload_policy="kunserve", exchange=mode, device_memory=SCARCE, calm_window=0.3,
                 max_num_batched_tokens=16) as c:
        submit(c, prompts, params, instance=0)
        outs: dict[str, list[RequestOutput]] = {}
        deadline = time.monotonic() + 30
        mid = []
        while not mid:
            assert time.monotonic() < deadline
            for o in c.step(0.05):
                outs.setdefault(o.request_id, []).append(o)
            mid = [s for s in c.instances[0].scheduler.running if 0 < s.num_computed_tokens < s.num_prompt_tokens]
        c.elastic.drop_now()
        assert len(c.instances) == 1 and not c.instances[0].placed(mid[0])
        for rid, seq in run_until_replicas(c).items():
            outs.setdefault(rid, []).extend(seq)
        assert tokens(outs) == want
        assert c.stats().num_drops_total == 1
        assert_nothing_held(c)


@pytest.mark.parametrize("mode", ["stall", "remote-attention"])
def test_a_restore_while_requests_are_still_exchanging(tiny: Path, mode: str) -> None:
    """The group splits before every request's KV has moved: those go home whole, the moved
    ones come back; nothing fails and no token changes."""
    prompts = PROMPTS[:3]
    want = reference(tiny, prompts)
    with cluster(tiny, overload_policy="kunserve", exchange=mode, device_memory="16MiB", calm_window=600) as c:
        c.elastic.chunk = 1  # one request per chunk: the exchange takes several steps
        submit(c, prompts, instance=0)
        outs: dict[str, list[RequestOutput]] = {}
        deadline = time.monotonic() + 60
        while not all(s.num_computed_tokens for s in c.instances[0].scheduler.running) or len(
                c.instances[0].scheduler.running) < 3:
            assert time.monotonic() < deadline
            for o in c.step(0.05):
                outs.setdefault(o.request_id, []).append(o)
        c.elastic.drop_now()
        while c.stats().exchanged_bytes_total == 0:  # the first request's KV has moved
            assert time.monotonic() < deadline, c.states
            for o in c.step(0.02):
                outs.setdefault(o.request_id, []).append(o)
        group = c.instances[0]
        assert sum(not group.placed(s) for s in group.scheduler.running) >= 1  # some still on their old device
        c.elastic.restore_now(0)
        for rid, seq in run_until_replicas(c).items():
            outs.setdefault(rid, []).extend(seq)
        assert tokens(outs) == want
        assert c.stats().num_restores_total == 1
        assert_nothing_held(c)


def test_a_disconnect_storm_during_the_exchange_leaks_no_page(tiny: Path) -> None:
    with cluster(tiny, overload_policy="kunserve", exchange="stall", device_memory=SCARCE, calm_window=0.3) as c:
        c.elastic.chunk = 2
        submit(c, PROMPTS, instance=0)
        deadline = time.monotonic() + 60
        while not c.elastic.groups.get(0) or not c.elastic.groups[0].pending:
            assert time.monotonic() < deadline, c.states
            c.step(0.02)
        # Every request goes away while a chunk is in flight (a client's disconnect aborts it).
        ended = {o.request_id for o in c.abort([f"r{i}" for i in range(len(PROMPTS))])}
        outs = run_until_replicas(c)
        ended |= {rid for rid, seq in outs.items() if seq[-1].finish_reason == "abort"}
        assert ended == {f"r{i}" for i in range(len(PROMPTS))}
        assert_nothing_held(c)


def test_kill_9_of_a_member_of_a_merged_group(tiny: Path) -> None:
    """The group's requests end with errors within 5 s; the dead worker comes back, the
    survivor reloads what it dropped, and the cluster is two replicas that serve."""
    want = reference(tiny)
    with cluster(tiny, overload_policy="kunserve", exchange="remote-attention", device_memory=SCARCE,
                 calm_window=600) as c:
        submit(c, PROMPTS, instance=0)
        deadline = time.monotonic() + 30
        while len(c.instances) != 1:
            assert time.monotonic() < deadline
            c.step(0.1)
        victim = c.workers[1].pid
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        outs: dict[str, list[RequestOutput]] = {}
        while c.has_unfinished:
            for o in c.step(0.1):
                outs.setdefault(o.request_id, []).append(o)
        assert time.monotonic() - killed < 5.0
        assert all(seq[-1].finish_reason == "error" for seq in outs.values()) and len(outs) == len(PROMPTS)
        deadline = time.monotonic() + 60
        while set(c.states.values()) != {"serving"} or len(c.states) != 2:
            assert time.monotonic() < deadline, c.states
            c.step(0.2)
        assert [[m.layers for m in i.members] for i in c.instances.values()] == [[(0, 3)], [(0, 3)]]
        submit(c, PROMPTS[:2], instance=0, prefix="a")
        submit(c, PROMPTS[2:4], instance=1, prefix="b")
        got = tokens(drain(c))
        assert got == {"a0": want["r0"], "a1": want["r1"], "b0": want["r2"], "b1": want["r3"]}
        assert_nothing_held(c)
