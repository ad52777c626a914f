"""The engine core of one worker: schedule, run the model, sample, commit.

It speaks in the messages of `engine/messages.py`: requests in full, then aborts; out go the
new token ids of each step. Text (detokenization, stop strings) is the front end's business.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from kunlite.config import ConfigError, EngineConfig
from kunlite.engine.cpu_tuning import keep_freed_memory
from kunlite.engine.messages import EngineRequest, EngineStats, RequestOutput, StepTiming
from kunlite.engine.preemption import make_policy
from kunlite.engine.runner import ModelRunner, StepInputs
from kunlite.engine.sampler import Sampler, SamplingBatch
from kunlite.engine.scheduler import Scheduler, SchedulerOutput
from kunlite.engine.sequence import Sequence

log = logging.getLogger(__name__)


def eos_token_ids(model_dir: str | Path) -> frozenset[int]:
    """EOS ids from generation_config.json (int or list), else config.json."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
            if ids:
                break
    return frozenset(ids)


def stop_reason(seq: Sequence, eos: frozenset[int], max_model_len: int) -> str | None:
    """Why the sequence ends after its latest token, or None. Stop strings are checked by the
    front end, on text."""
    p, token, n_out = seq.params, seq.output_token_ids[-1], len(seq.output_token_ids)
    if n_out >= p.min_tokens and ((not p.ignore_eos and token in eos) or token in p.stop_token_ids):
        return "stop"
    if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= max_model_len:
        return "length"
    return None


class EngineCore:
    def __init__(self, config: EngineConfig, *, priority_order: bool = False) -> None:
        self.config = config
        if not config.device.is_cuda:
            keep_freed_memory()
        if config.device.threads:
            torch.set_num_threads(config.device.threads)
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config)
        self.kv = self.runner.new_block_manager()
        self.scheduler = Scheduler(config.scheduler, self.kv, make_policy(config.scheduler.preemption_mode),
                                   priority_order=priority_order)
        self.sampler = Sampler(seed=config.seed)
        self.eos = eos_token_ids(config.model_dir)
        self.max_model_len = config.max_model_len
        self.timings: list[StepTiming] = []
        if self.kv_capacity_tokens < self.max_model_len:
            # A sequence that can never fit would wait forever: refuse to start instead.
            raise ConfigError(
                f"the KV cache holds {self.kv_capacity_tokens} tokens, fewer than --max-model-len "
                f"{self.max_model_len}; raise --device-memory or lower --max-model-len")
        log.info("KV capacity: %d tokens (%d blocks of %d tokens, %d KV pages of %d KiB; %d parameter pages)",
                 self.kv_capacity_tokens, self.kv.num_total_blocks, self.kv.page_size, self.kv.num_kv_pages,
                 self.runner.pool.page_bytes // 1024, self.runner.pool.param_pages)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv.num_total_blocks * self.kv.page_size

    # ------------------------------------------------------------------ requests

    def add_request(self, req: EngineRequest) -> None:
        seq = Sequence(seq_id=req.request_id, request_id=req.request_id, index=0,
                       prompt_token_ids=list(req.prompt_token_ids), params=req.params,
                       arrival_time=req.arrival_time, priority=req.priority,
                       pending_children=req.params.n - 1)
        self.scheduler.add(seq)

    def abort(self, request_ids: list[str], choices: list[tuple[str, int]] = ()) -> list[RequestOutput]:
        """End whole requests, or single choices of them; their KV is freed at once."""
        wanted = set(choices)
        outs = []
        for rid in set(request_ids) | {rid for rid, _ in wanted}:
            for seq in self.scheduler.find(rid):
                if rid in request_ids or (rid, seq.index) in wanted:
                    self.scheduler.finish(seq, "abort")
                    outs.append(self._output(seq, []))
        return outs

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        inputs = self.runner.prepare(sched.scheduled, self.kv)
        logits = self.runner.execute(inputs)  # (R, V)
        rows = self._fork(sched, inputs)
        tokens, logprobs = self._sample(logits, rows)
        outputs = self._commit(sched, rows, tokens, logprobs)
        self._time(sched, start)
        return outputs

    def _fork(self, sched: SchedulerOutput, inputs: StepInputs) -> list[tuple[Sequence, int]]:
        """(sequence, logits row) for every sequence that samples; n > 1 children share their
        parent's row and, from here on, its prompt KV."""
        rows = [(seq, i) for i, seq in enumerate(inputs.sampled)]
        pairs = self.scheduler.fork_children(sched)
        if pairs:
            self.runner.copy_pages(*self.kv.page_copies(sched.block_copies))
            row_of = {id(seq): i for seq, i in rows}
            rows += [(child, row_of[id(parent)]) for parent, child in pairs]
        return rows

    def _sample(self, logits: torch.Tensor, rows: list[tuple[Sequence, int]]):  # type: ignore[no-untyped-def]
        if not rows:
            return [], None
        seqs = [s for s, _ in rows]
        index = [i for _, i in rows]
        if index != list(range(len(index))):
            logits = logits[torch.tensor(index, device=logits.device)]  # (R', V)
        batch = SamplingBatch.from_params(
            [s.params for s in seqs], [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs],
            [len(s.output_token_ids) for s in seqs], sorted(self.eos), logits.shape[1], logits.device)
        out = self.sampler(logits, batch)
        return out.token_ids.tolist(), out.logprobs

    def _commit(self, sched: SchedulerOutput, rows: list[tuple[Sequence, int]], tokens: list[int],
                logprobs) -> list[RequestOutput]:  # type: ignore[no-untyped-def]
        for seq, n in sched.scheduled:
            seq.num_computed_tokens += n
        outputs = []
        for r, (seq, _) in enumerate(rows):
            seq.append_token(tokens[r])
            reason = stop_reason(seq, self.eos, self.max_model_len)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            lp = [logprobs[r]] if logprobs is not None and logprobs[r] is not None else None
            outputs.append(self._output(seq, [tokens[r]], lp))
        return outputs

    def _output(self, seq: Sequence, tokens: list[int], logprobs=None) -> RequestOutput:  # type: ignore[no-untyped-def]
        return RequestOutput(seq.request_id, seq.index, tokens, logprobs, seq.finish_reason,
                             seq.num_prompt_tokens, seq.num_cached_tokens)

    def _time(self, sched: SchedulerOutput, start: float) -> None:
        prefill = sum(n for s, n in sched.scheduled if n > 1)
        decode = sched.num_batched_tokens - prefill
        context = sum(s.num_computed_tokens for s, _ in sched.scheduled)
        self.timings.append(StepTiming(prefill, decode, context, time.perf_counter() - start))

    # ------------------------------------------------------------------ reporting

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_pages_used=self.kv.num_used_blocks * self.kv.layers_per_block,
                           kv_pages_total=self.kv.num_kv_pages,
                           num_preemptions_total=self.scheduler.num_preemptions,
                           param_pages=self.runner.pool.param_pages, page_size=self.kv.page_size)

    def take_timings(self) -> list[StepTiming]:
        out, self.timings = self.timings, []
        return out
