"""Two CPU workers over gloo: pipelines and overload policies give the greedy tokens of an
undisturbed single device, KV accounting is exact afterwards, and deaths end requests with
errors without leaking pages on the survivors."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from clusterkit import PROMPTS, SCARCE, assert_nothing_held, cluster, drain, reference, submit, tokens

from tiny_models import make_tiny_model


@pytest.mark.parametrize("variant", ["llama-mha-untied", "qwen2-bias"])
def test_a_two_stage_pipeline_gives_the_tokens_of_one_device(tiny_root: Path, variant: str) -> None:
    model = make_tiny_model(tiny_root, variant)
    want = reference(model)
    with cluster(model, pipeline_parallel=2, device_memory="16MiB") as c:
        assert [m.layers for m in c.instances[0].members] == [(0, 2), (2, 3)]
        submit(c, PROMPTS)
        assert tokens(drain(c)) == want
        assert_nothing_held(c)


@pytest.mark.parametrize("policy,pp", [("recompute", 1), ("swap", 1), ("migrate", 1), ("swap", 2)])
def test_each_overload_policy_forced_mid_generation_keeps_the_tokens(tiny: Path, policy: str, pp: int) -> None:
    """Every request goes to instance 0, whose KV cannot hold them all: it must preempt, swap
    or migrate while they decode."""
    want = reference(tiny)
    memory = SCARCE if pp == 1 else str(460 * 1024)  # a 2-stage member holds fewer parameter pages
    # The even split keeps both microbatches full: balanced ones admit this small workload more
    # slowly, and its KV would not run out.
    with cluster(tiny, overload_policy=policy, pipeline_parallel=pp, device_memory=memory, microbatch="even",
                 swap_space="256KiB" if policy == "swap" else None) as c:
        submit(c, PROMPTS, instance=0)
        assert tokens(drain(c)) == want
        stats = c.stats()
        if policy == "recompute":
            assert stats.num_preemptions_total > 0
        elif policy == "swap":
            assert stats.num_swaps_out_total > 0 and stats.num_swaps_in_total == stats.num_swaps_out_total
            assert stats.swap_out_bytes_total > 0
        else:
            assert stats.num_migrations_total > 0 and stats.migration_bytes_total > 0
            # A request may finish while its KV is on the way (then the copy is dropped, as it
            # should be); any other abort is a fault here.
            aborted = [e for e in c.take_events() if e.kind == "migration_aborted"]
            assert len(aborted) == stats.num_migrations_aborted_total
            assert all(e.detail.endswith("the request ended at the source") for e in aborted), aborted
            assert c.take_moved(), "the front end is told where migrated requests went"
        assert_nothing_held(c)


def test_a_death_in_the_middle_of_a_migration_leaks_nothing_on_the_survivor(tiny: Path) -> None:
    """The destination stops (SIGSTOP) before the migration starts, so the copy is pending when
    it is declared dead (no heartbeat) and killed. The source frees nothing it should keep and
    keeps nothing it should free: its requests finish with undisturbed tokens."""
    want = reference(tiny)
    with cluster(tiny, overload_policy="migrate", device_memory=SCARCE, heartbeat_timeout=3.0,
                 restart_workers=False) as c:
        os.kill(c.workers[1].pid, signal.SIGSTOP)
        submit(c, PROMPTS, instance=0)
        outs = drain(c)
        assert tokens(outs) == want
        stats = c.stats()
        assert stats.num_migrations_aborted_total >= 1 and stats.num_worker_deaths_total == 1
        assert c.states == {0: "serving", 1: "degraded"}
        survivor = c.instances[0]
        survivor.kv.check()
        assert survivor.members[0].kv.num_used_pages == 0 and not survivor.members[0].kv.tables
        assert not c.migrator.active


def test_kill_9_ends_the_instance_requests_with_errors_and_it_comes_back(tiny: Path) -> None:
    want = reference(tiny)
    with cluster(tiny, device_memory="16MiB") as c:
        submit(c, PROMPTS, instance=0, prefix="a")
        submit(c, PROMPTS, instance=1, prefix="b")
        outs: dict[str, list] = {}
        while len(outs) < 2 * len(PROMPTS):  # every request has a token
            for o in c.step(0.5):
                outs.setdefault(o.request_id, []).append(o)
        victim = c.workers[1].pid
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        errors_at = None
        while c.has_unfinished:
            for o in c.step(0.2):
                outs.setdefault(o.request_id, []).append(o)
            if errors_at is None and all(outs.get(f"b{i}") and outs[f"b{i}"][-1].finish_reason == "error"
                                         for i in range(len(PROMPTS))):
                errors_at = time.monotonic()
        assert errors_at is not None and errors_at - killed < 5.0
        # The other instance's requests all completed, with the undisturbed tokens.
        a = {rid[1:]: toks for rid, toks in tokens(outs).items() if rid.startswith("a")}
        assert {f"r{k}": v for k, v in a.items()} == want
        # The dead worker is started again, the world re-formed, and its instance serves.
        deadline = time.monotonic() + 60
        while c.states[1] != "serving":
            assert time.monotonic() < deadline, c.states
            c.step(0.5)
        assert c.workers[1].pid != victim and c.generation == 1
        submit(c, PROMPTS[:2], instance=1, prefix="c")
        assert tokens(drain(c)) == {"c0": want["r0"], "c1": want["r1"]}
        assert_nothing_held(c)
