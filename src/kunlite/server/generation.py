"""One HTTP request in the engine: admission, its engine requests, their outputs, the end.

A completions request with a list of prompts becomes one engine request per prompt; all of
them report into one asyncio.Queue. The queue also receives `DISCONNECTED` when the client
goes away (while a watcher task listens for `http.disconnect`) and `EngineDead` when the
worker dies, so that `next()` is the only place that waits.

Lifecycle: admit() -> next()... -> close(). close() is idempotent and runs whatever happens
(success, error, disconnect, cancellation): it aborts the engine requests still running, so
their KV pages are freed, and forgets them in the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from kunlite.engine.messages import EngineDead, EngineRequest, RequestOutput
from kunlite.engine.output_processor import ChoiceDelta, RequestState
from kunlite.sampling_params import SamplingParams
from kunlite.server.admission import InFlight
from kunlite.server.errors import ApiError
from kunlite.server.runtime import Runtime

log = logging.getLogger("kunlite.server")

DISCONNECTED = object()  # put into the queue when the client disconnects


class ClientGone(Exception):
    """The client disconnected; nobody will read the response."""


def engine_unavailable(why: str) -> ApiError:
    return ApiError(503, f"engine unavailable: {why}", code="engine_unavailable")


class Generation:
    def __init__(self, rt: Runtime, kind: str, prompts: list[list[int]], params: SamplingParams,
                 priority: int = 0) -> None:
        self.rt = rt
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.arrival = time.monotonic()
        self.params = params
        self.priority = priority
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.states = [RequestState(f"{self.id}-{i}", ids, params, rt.tokenizer)  # type: ignore[arg-type]
                       for i, ids in enumerate(prompts)]
        self._index = {s.request_id: i for i, s in enumerate(self.states)}
        self.deadline: float | None = None  # monotonic; shed if nothing came back by then
        self.started = False  # some output came back
        self.closed = False
        self._shed = False  # ended by its deadline (counted as rejected, not as a success)
        self._submitted = False
        self._watcher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ admission

    def admit(self) -> None:
        """Ask admission, then hand every prompt to the engine; ApiError 429/503 if not."""
        rt = self.rt
        if rt.engine is None or not rt.engine.alive or rt.policy is None:
            raise engine_unavailable(rt.status_detail)
        max_tokens = self.params.max_tokens or 1
        instance = rt.dispatch()
        if instance is None:
            raise engine_unavailable("no instance of the cluster is serving")
        whole = InFlight(prompt_tokens=sum(len(s.prompt_token_ids) for s in self.states),
                         n=self.params.n * len(self.states), max_tokens=max_tokens,
                         priority=self.priority, arrival=self.arrival, instance=instance)
        decision = rt.policy.decide(whole, rt.ledger, time.monotonic(), rt.step_start(instance), instance=instance,
                                    model=rt.cost_model(instance))
        log.debug("%s: %s, predicted TTFT %.0f ms (%s)", self.id, "admitted" if decision.admit else "rejected",
                  decision.predicted_ttft * 1e3, decision.reason or "ok")
        if not decision.admit:
            rt.metrics.rejected(decision.reason or "overload")
            raise ApiError(429, decision.message, code=decision.reason, retry_after=decision.retry_after)
        self.deadline = rt.policy.deadline(self.arrival)
        now = time.time()
        for s in self.states:
            rt.ledger.add(s.request_id, InFlight(len(s.prompt_token_ids), self.params.n, max_tokens,
                                                 self.priority, self.arrival, predicted_ttft=decision.raw_ttft,
                                                 instance=instance))
            rt.engine.submit(EngineRequest(s.request_id, s.prompt_token_ids, self.params, now, self.priority,
                                           instance), self.queue)
        self._submitted = True

    # ------------------------------------------------------------------ disconnects

    def watch(self, receive: Any) -> None:
        """Listen for the client's http.disconnect (the body has been read already)."""
        async def listen() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.queue.put_nowait(DISCONNECTED)
                    return

        self._watcher = asyncio.create_task(listen())

    def unwatch(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    # ------------------------------------------------------------------ outputs

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.states)

    async def next(self) -> tuple[int, ChoiceDelta]:
        """The next change a client can see: (prompt index, delta). Raises ApiError (shed:
        429; engine gone: 503) or ClientGone."""
        while True:
            item = await self._get()
            if item is DISCONNECTED:
                raise ClientGone
            if isinstance(item, EngineDead):
                raise engine_unavailable(item.message)
            assert isinstance(item, RequestOutput)  # invariant: the queue holds nothing else
            if item.finish_reason == "error":  # the device serving it died; nothing more will come
                raise engine_unavailable("a device serving this request failed; the request was not completed")
            i = self._index[item.request_id]
            delta = self.states[i].process(item)
            if delta is None:
                continue
            self.started = True
            if delta.abort:  # a stop string matched: the engine must stop this choice
                self.rt.engine.abort([], [(item.request_id, delta.index)])  # type: ignore[union-attr]
            return i, delta

    async def _get(self) -> Any:
        if self.started or self.deadline is None or not self.queue.empty():
            return await self.queue.get()
        timeout = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.queue.get(), max(timeout, 0.0))
        except asyncio.TimeoutError:
            waited = time.monotonic() - self.arrival
            for s in self.states:  # its TTFT is at least `waited`: the prediction was short
                self.rt.calibrate(s.request_id, waited)
            self.rt.metrics.rejected("deadline")
            self._shed = True
            raise ApiError(429, f"the request was shed: it waited {waited * 1e3:.0f} ms without a first token, "
                           f"past its TTFT deadline ({self.rt.cfg.slo_ttft_ms:.0f} ms)",
                           code="deadline_exceeded", retry_after=1.0) from None

    def usage(self) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, prompt tokens served from the prefix cache)."""
        return (sum(len(s.prompt_token_ids) for s in self.states), sum(s.num_output_tokens for s in self.states),
                sum(s.num_cached_tokens for s in self.states))

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        """Abort what still runs, forget everything, count the outcome. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.unwatch()
        rt = self.rt
        if not self._submitted:
            return
        unfinished = [s.request_id for s in self.states if not s.finished]
        if unfinished and rt.engine is not None:
            rt.engine.abort(unfinished)
        for s in self.states:
            rt.forget(s.request_id)
            if not self._shed:
                for c in s.choices:
                    rt.metrics.success(c.finish_reason or "abort")
        if not unfinished:
            rt.metrics.e2e.observe(time.monotonic() - self.arrival)
