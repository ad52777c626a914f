"""The front end's side of the engine process: start it, feed it, route what it says.

The worker (`engine/worker.py`) runs in a "spawn" process; a duplex Pipe carries msgpack
bytes of the typed messages in `engine/messages.py`. Two small threads keep blocking pipe I/O
off the event loop:
  - the reader decodes each FromEngine message and hands it to the loop
    (call_soon_threadsafe); EOF means the worker is gone;
  - the writer sends queued ToEngine bytes, so that a full pipe never blocks the loop (and
    the two processes can never deadlock on each other's full pipes).
On the loop, each RequestOutput goes to the asyncio.Queue registered for its request id.

Worker death (EOF, or an EngineDead message) puts an `EngineDead` item into every registered
queue, so that every in-flight request ends with an error instead of hanging. The worker is
not restarted: `alive` stays False and the server answers 503 (a supervisor restarts the
whole server).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing.connection import Connection

import msgspec

from kunlite.engine.args import EngineOptions
from kunlite.engine.messages import (AbortRequests, EngineDead, EngineOutputs, EngineReady, EngineRequest,
                                     FromEngine, RequestOutput, Shutdown, ToEngine)
from kunlite.engine.worker import worker_main

log = logging.getLogger("kunlite.server.engine")

# What a request's queue receives: its outputs, or EngineDead when the worker is gone.
EngineItem = RequestOutput | EngineDead


class EngineStartError(RuntimeError):
    pass


class EngineClient:
    def __init__(self, options: EngineOptions, *, priority_order: bool = False, warmup: bool = True,
                 on_outputs: Callable[[EngineOutputs], None] | None = None,
                 on_dead: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.priority_order = priority_order
        self.warmup = warmup
        self.on_outputs = on_outputs
        self.on_dead = on_dead
        self.ready: EngineReady | None = None
        self.dead: str | None = None  # why the worker is gone; None while it lives
        self._routes: dict[str, asyncio.Queue[EngineItem]] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready_future: asyncio.Future[EngineReady] | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> EngineReady:
        """Spawn the worker and wait until its model is loaded."""
        self._loop = asyncio.get_running_loop()
        self._ready_future = self._loop.create_future()
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=worker_main, name="kunlite-engine", daemon=True,
                                    args=(asdict(self.options), child, self.priority_order, self.warmup,
                                          logging.getLogger().getEffectiveLevel()))
        self._process.start()
        child.close()  # the worker holds the only other end: its exit is our EOF
        threading.Thread(target=self._read, args=(conn,), name="kunlite-engine-reader", daemon=True).start()
        threading.Thread(target=self._write, args=(conn,), name="kunlite-engine-writer", daemon=True).start()
        self.ready = await self._ready_future
        return self.ready

    @property
    def alive(self) -> bool:
        return self.ready is not None and self.dead is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._process is None:
            return
        self._send(Shutdown())
        self._outbox.put(None)
        proc = self._process
        await asyncio.get_running_loop().run_in_executor(None, proc.join, timeout)
        if proc.is_alive():
            proc.kill()
            await asyncio.get_running_loop().run_in_executor(None, proc.join, timeout)

    # ------------------------------------------------------------------ requests

    def submit(self, req: EngineRequest, q: asyncio.Queue[EngineItem]) -> None:
        """Route `req`'s outputs to `q` and send it to the engine. The caller checks `alive`."""
        self._routes[req.request_id] = q
        if self.dead is not None:
            q.put_nowait(EngineDead(self.dead))
            return
        self._send(req)

    def abort(self, request_ids: list[str], choices: list[tuple[str, int]] | None = None) -> None:
        if self.dead is None and (request_ids or choices):
            self._send(AbortRequests(list(request_ids), list(choices or [])))

    def release(self, request_id: str) -> None:
        """Forget the route; anything the engine still sends for it is dropped."""
        self._routes.pop(request_id, None)

    @property
    def num_routes(self) -> int:
        return len(self._routes)

    def _send(self, msg: ToEngine) -> None:
        self._outbox.put(self._encoder.encode(msg))

    # ------------------------------------------------------------------ threads

    def _write(self, conn: Connection) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                conn.send_bytes(data)
            except (OSError, ValueError):
                return  # the worker is gone; the reader reports it

    def _read(self, conn: Connection) -> None:
        decoder = msgspec.msgpack.Decoder(FromEngine)
        why = "the engine process closed its pipe"
        try:
            while True:
                msg = decoder.decode(conn.recv_bytes())
                self._to_loop(self._on_message, msg)
                if isinstance(msg, EngineDead):
                    return
        except (EOFError, OSError):
            pass
        except msgspec.DecodeError as e:  # cannot happen between matching versions
            why = f"undecodable message from the engine: {e}"
        proc = self._process
        if proc is not None:
            proc.join(2.0)
            why = f"{why} (exit code {proc.exitcode})"
        self._to_loop(self._on_dead, why)

    def _to_loop(self, fn: Callable[..., None], arg: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, arg)
            except RuntimeError:  # the loop closed meanwhile (server shutdown)
                pass

    # ------------------------------------------------------------------ on the loop

    def _on_message(self, msg: FromEngine) -> None:
        if isinstance(msg, EngineOutputs):
            if self.on_outputs is not None:
                self.on_outputs(msg)
            for out in msg.outputs:
                q = self._routes.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
        elif isinstance(msg, EngineReady):
            if self._ready_future is not None and not self._ready_future.done():
                self._ready_future.set_result(msg)
        elif isinstance(msg, EngineDead):
            self._on_dead(f"the engine failed: {msg.message}")

    def _on_dead(self, why: str) -> None:
        if self.dead is not None:
            return
        self.dead = why
        if not self._stopping:
            log.error("engine worker is gone: %s", why)
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.set_exception(EngineStartError(why))
        for q in self._routes.values():
            q.put_nowait(EngineDead(why))
        if self.on_dead is not None:
            self.on_dead(why)
