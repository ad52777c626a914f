"""The coordinator of a cluster: instances of device workers, driven as one engine.

It runs in the engine process (behind the server) or in the offline `LLM`'s process. It hosts
the rendezvous store and the control socket, starts the local workers, and then loops:

    plan      every serving instance with room for a step plans one; its members get their work
    collect   StageDone from the last member commits the step (tokens become outputs)
    watch     a worker that exits, stops sending heartbeats or reports a failure is dead: its
              instance's requests end with an error at once, the worker is started again, and
              once it is loaded the world is re-formed (every worker joins a new generation
              while no transfer is in flight); then the instance serves again

Instances are replicas (one member) or static pipelines (`--pipeline-parallel K` members over
balanced contiguous layer ranges). Scheduling lives here, in each `Instance`; the workers only
execute. Every wait is a poll with a timeout over the control socket, the workers' pidfds and
the caller's wake-up descriptor.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace
from typing import Any

import msgspec
import zmq

from kunlite.config import ConfigError
from kunlite.engine.args import EngineOptions
from kunlite.engine.block_manager import BlockManager
from kunlite.engine.clock import REAL, Clock
from kunlite.engine.cluster import launch, recovery, report
from kunlite.engine.cluster.dispatch import InstanceLoad, blocks_for, choose_instance
from kunlite.engine.cluster.launch import WorkerState
from kunlite.engine.cluster.messages import (Assign, FromWorker, Heartbeat, Hello, Ping, Ready, Reform, Reformed,
                                             Shutdown, StepFailed, TransferDone, TransferFailed, WorkerFailed)
from kunlite.engine.cluster.elastic import Elastic
from kunlite.engine.cluster.migrate import Migrator
from kunlite.engine.cluster.recovery import DOWN
from kunlite.engine.instance import Instance, Member, eos_token_ids
from kunlite.engine.messages import (ACCEPTING_STATES, SERVING_STATES, ClusterEvent, EngineRequest, EngineStats,
                                     RequestOutput, StepTiming)
from kunlite.engine.plan import TriggerConfig
from kunlite.engine.preemption import make_policy
from kunlite.engine.work import StageDone
from kunlite.transfer.control import ControlError, ControlServer
from kunlite.transfer.world import STORE_KEY_CONTROL, Rendezvous, host_store

log = logging.getLogger("kunlite.cluster")

PING_S = 1.0  # the coordinator's keep-alive to idle workers
SERVING = SERVING_STATES  # states in which an instance steps and takes requests


class Cluster:
    clock: Clock = REAL  # what the policies read; a simulation's cluster sets a virtual one

    def __init__(self, options: EngineOptions, *, priority_order: bool = False, log_level: str = "info") -> None:
        self._setup(options, priority_order, log_level)
        cfg = options
        N = cfg.devices
        local = N if cfg.local_devices is None else cfg.local_devices
        addr = cfg.master_addr
        port = cfg.master_port or launch.free_port(addr)
        try:
            self.store = host_store(addr, port, cfg.join_timeout)
        except Exception as e:  # noqa: BLE001 - torch raises several kinds for a port in use
            raise ConfigError(f"cannot open the rendezvous store on {addr}:{port}: {e}") from None
        self.rdzv = Rendezvous(addr, port, N, 0)
        self.control: ControlServer[Any] = ControlServer(addr if addr != "0.0.0.0" else "0.0.0.0", 0, FromWorker)
        self.store.set(STORE_KEY_CONTROL, self.control.address.replace("0.0.0.0", _advertised(addr)))
        self.workers = {r: WorkerState(rank=r, local=r < local) for r in range(N)}
        try:
            for w in self.workers.values():
                if w.local:
                    self._spawn(w)
            self._bring_up()
        except BaseException:
            self.shutdown()
            raise
        self._ready()

    def _setup(self, options: EngineOptions, priority_order: bool, log_level: str) -> None:
        """Everything but the workers: the policies' state."""
        self.options = options
        self.config = options.build()
        options.check_cluster()
        cfg, model = options, self.config.model
        K = cfg.pipeline_parallel
        if K > model.num_layers:
            raise ConfigError(f"--pipeline-parallel {K} exceeds the model's {model.num_layers} layers")
        self.stage_layers = launch.balanced_ranges(model.num_layers, K)
        self.priority_order = priority_order
        self.log_level = log_level
        self.eos = eos_token_ids(self.config.model_dir)
        self.max_model_len = self.config.max_model_len
        self.policy_name = cfg.overload_policy
        self.swap_bytes = self.config.cache.swap_space
        self.workers: dict[int, WorkerState] = {}
        self.generation = -1
        self.instances: dict[int, Instance] = {}
        self.step_ids = itertools.count()  # shared: a merged group commits its parts' steps
        self.states: dict[int, str] = {}
        self.counters: dict[str, float] = {"num_worker_deaths_total": 0}
        self.moved: list[tuple[str, int]] = []
        self.events: list[ClusterEvent] = []
        self.outputs_pending: list[RequestOutput] = []  # produced outside a step (an abort that waited)
        self.kv_of: dict[int, BlockManager] = {}  # each device's KV accounting, whatever instance it serves
        self.scratch_of: dict[int, int] = {}  # kunserve: each device's scratch page (remote attention)
        self.replica_kv_tokens: dict[int, int] = {}  # KV tokens each device holds as a replica
        self.retired: dict[str, float] = {}  # cumulative counters of instances merged or split away
        self._transfer_ids = itertools.count()
        self.migrator = (Migrator(self.send, self.config.cache.page_size, self.new_transfer_id, self.clock)
                         if cfg.overload_policy == "migrate" else None)
        self.elastic: Elastic | None = None
        self.quiescing = False  # no new steps: the world is about to be re-formed
        self._reforming: int | None = None  # the generation being formed
        self._reform_deadline = 0.0
        self._closed = False
        self._record_batches = False

    def _ready(self) -> None:
        """The workers are loaded and the instances built: start the policies that need them."""
        cfg = self.options
        if cfg.overload_policy == "kunserve":
            self.elastic = Elastic(self, cfg.exchange, TriggerConfig(cfg.drop_usage, cfg.calm_fraction, cfg.calm_window))
        self.kv_capacity_tokens = sum(i.kv.num_total_blocks for i in self.instances.values()) * self.config.cache.page_size
        log.info("cluster ready: %d devices, %d instance(s) of %d stage(s) %s; KV capacity %d tokens",
                 len(self.workers), len(self.instances), cfg.pipeline_parallel, self.stage_layers,
                 self.kv_capacity_tokens)

    # ------------------------------------------------------------------ bring-up

    def _spawn(self, w: WorkerState) -> None:
        launch.spawn(w, replace(self.rdzv, rank=w.rank, local_rank=w.rank), self.log_level,
                     self.options.comm_timeout)
        w.last_seen = time.monotonic()

    def _assignment(self, rank: int) -> Assign:
        K = self.options.pipeline_parallel
        opts = replace(self.options, layer_range=self.stage_layers[rank % K], devices=1, local_devices=None)
        device = self.options.device
        if device.startswith("cuda"):
            device = f"cuda:{rank if self.workers[rank].local else 0}"
        opts = replace(opts, device=device)
        slots = 0
        if self.swap_bytes:
            slots = max(self.swap_bytes // self._page_bytes_estimate(), 1)
        return Assign(_builtins(opts), int(slots), device)

    def _page_bytes_estimate(self) -> int:
        m, dtype = self.config.model, self.config.device.torch_dtype
        return 2 * self.config.cache.page_size * m.num_kv_heads * m.head_dim * dtype.itemsize

    def _bring_up(self) -> None:
        """Wait until every rank is loaded, then form generation 0 and build the instances."""
        deadline = time.monotonic() + self.options.join_timeout
        while any(w.state != "ready" for w in self.workers.values()):
            if time.monotonic() > deadline:
                missing = sorted(r for r, w in self.workers.items() if w.state in ("starting", "dead"))
                loading = sorted(r for r, w in self.workers.items() if w.state == "loading")
                raise ConfigError(
                    f"workers did not join within {self.options.join_timeout:.0f} s: ranks {missing} never reached "
                    f"the rendezvous at {self.rdzv.master_addr}:{self.rdzv.master_port}"
                    + (f", ranks {loading} were still loading" if loading else ""))
            self._poll(0.2)
            for w in self.workers.values():
                if w.local and w.state != "dead" and launch.exited(w):
                    w.state, w.why = "dead", f"its process exited with status {w.popen.returncode}"  # type: ignore[union-attr]
                if w.state == "dead":
                    raise ConfigError(f"worker {w.rank} failed to start: {w.why}")
        self._form_first_generation()
        self._build_instances()

    def _build_instances(self) -> None:
        K = self.options.pipeline_parallel
        self.instances = {g: self._new_instance(g, list(range(g * K, g * K + K))) for g in range(len(self.workers) // K)}
        self.states = {i: "serving" for i in self.instances}

    def fresh_kv(self, rank: int, layers: tuple[int, int]) -> BlockManager:
        """KV accounting of a device with every parameter it was assigned resident. Under
        kunserve one page is kept out of it: the scratch page of remote attention."""
        ready = self.workers[rank].ready
        assert ready is not None  # invariant: accounting exists for loaded workers only
        pages = list(ready.kv_pages)
        if self.options.overload_policy == "kunserve":
            self.scratch_of[rank] = pages.pop(0)
        return BlockManager(page_size=self.config.cache.page_size, layers=layers,
                            num_layers=self.config.model.num_layers, pages=pages,
                            enable_prefix_caching=self.config.cache.enable_prefix_caching)

    def make_instance(self, iid: int, members: list[Member]) -> Instance:
        slots = [self._assignment(m.rank).swap_slots for m in members]
        inst = Instance(iid, members, self.config.scheduler, make_policy(self.config.scheduler.preemption_mode, slots),
                        self.eos, self.max_model_len, priority_order=self.priority_order, step_ids=self.step_ids,
                        microbatch=self.options.microbatch, clock=self.clock)
        inst.record_batches = self._record_batches
        return inst

    def _new_instance(self, iid: int, ranks: list[int]) -> Instance:
        members = []
        for r in ranks:
            layers = self.stage_layers[r % len(ranks)]
            self.kv_of[r] = self.fresh_kv(r, layers)
            members.append(Member(r, layers, self.kv_of[r]))
            if len(ranks) == 1:
                self.replica_kv_tokens[r] = self.kv_of[r].num_total_blocks * self.config.cache.page_size
        inst = self.make_instance(iid, members)
        if inst.kv.num_total_blocks * self.config.cache.page_size < self.max_model_len:
            raise ConfigError(f"instance {iid} holds {inst.kv.num_total_blocks * self.config.cache.page_size} KV "
                              f"tokens, fewer than --max-model-len {self.max_model_len}; raise --device-memory or "
                              "lower --max-model-len")
        return inst

    def retire(self, inst: Instance) -> None:
        """An instance is replaced (merged, split): keep its cumulative counters."""
        counts = {"num_preemptions_total": inst.scheduler.num_preemptions,
                  **inst.swap_counters(self._page_bytes())}
        for k, v in counts.items():
            self.retired[k] = self.retired.get(k, 0) + v
        inst.scheduler.num_preemptions = 0

    def new_transfer_id(self) -> int:
        return next(self._transfer_ids)

    def _form_first_generation(self) -> None:
        """At bring-up: every worker joins generation 0 of the world (blocking)."""
        gen = self.generation + 1
        for w in self.workers.values():
            self.send(w.rank, Reform(gen))
        deadline = time.monotonic() + self.options.join_timeout
        while any(w.generation != gen for w in self.workers.values() if w.state == "ready"):
            if time.monotonic() > deadline:
                late = sorted(r for r, w in self.workers.items() if w.generation != gen)
                raise ConfigError(f"ranks {late} did not join generation {gen} of the world "
                                  f"(store {self.rdzv.master_addr}:{self.rdzv.master_port})")
            self._poll(0.2)
        self.generation = gen
        log.info("world generation %d formed by %d workers", gen, len(self.workers))

    # ------------------------------------------------------------------ requests

    def add_request(self, req: EngineRequest) -> list[RequestOutput]:
        """Queue a request on its instance (or the one the dispatcher picks). Returns an error
        output at once when no instance serves."""
        iid = req.instance
        if iid is None or self.states.get(iid) not in ACCEPTING_STATES:
            iid = choose_instance(self.loads())
            if iid is None:
                return [RequestOutput(req.request_id, i, [], None, "error", len(req.prompt_token_ids), 0)
                        for i in range(req.params.n)]
            if req.instance is not None:
                self.moved.append((req.request_id, iid))
        self.instances[iid].add_request(req)
        return []

    def abort(self, request_ids: list[str], choices: list[tuple[str, int]] = ()) -> list[RequestOutput]:
        return [o for inst in self.instances.values() for o in inst.abort(request_ids, choices)]

    @property
    def has_unfinished(self) -> bool:
        return any(i.has_unfinished for i in self.instances.values())

    def running_request_ids(self) -> set[str]:
        return {s.request_id for i in self.instances.values() for s in i.scheduler.running}

    def loads(self) -> list[InstanceLoad]:
        ps = self.config.cache.page_size
        return [InstanceLoad(i.id, self.states[i.id] in ACCEPTING_STATES, i.kv.num_total_blocks, i.kv.num_used_blocks,
                             sum(blocks_for(s.num_tokens, ps, s.pending_children + 1) for s in i.scheduler.waiting),
                             len(i.scheduler.running), len(i.scheduler.waiting)) for i in self.instances.values()]

    # ------------------------------------------------------------------ the loop

    def step(self, timeout_s: float = 0.0, wake_fd: int | None = None) -> list[RequestOutput]:
        """Plan what can run, wait up to `timeout_s` for workers (or `wake_fd`), handle what
        they said, plan again. Returns the outputs of the steps that committed."""
        outputs: list[RequestOutput] = []
        self._plan_all(outputs)
        self._poll(timeout_s, wake_fd, outputs)
        self._watch(outputs)
        if self.migrator is not None:
            self.migrator.advance()
            if not self.quiescing:
                self.migrator.trigger(self.instances, self.loads())
            self.moved += self.migrator.moved
            self.migrator.moved = []
        if self.elastic is not None and not self.quiescing:
            self.elastic.tick()
        self._plan_all(outputs)
        outputs += self.outputs_pending
        self.outputs_pending = []
        return outputs

    def _plan_all(self, outputs: list[RequestOutput]) -> None:
        if self.quiescing:
            return
        for inst in list(self.instances.values()):
            while self.states[inst.id] in SERVING and inst.can_plan():
                works = inst.plan()
                if works is None:
                    break
                for holder, serve in inst.remote_serves:  # before the requester's step: it waits on them
                    self.send_service(holder, serve)
                inst.remote_serves.clear()
                if self.elastic is not None:
                    self.elastic.counters["remote_attention_calls"] += inst.remote_calls
                inst.remote_calls = 0
                for work in works:
                    if not self.send(inst.members[work.stage].rank, work):
                        break

    def send_service(self, rank: int, msg: Any) -> bool:
        """A message to the worker's remote-attention server."""
        try:
            self.control.send(rank, msg, service=True)
        except ControlError as e:
            self._death(self.workers[rank], str(e), [])
            return False
        return True

    def send(self, rank: int, msg: Any) -> bool:
        """Send a control message; False (and the worker is dead) if it cannot be reached."""
        w = self.workers[rank]
        if w.state in ("dead", "starting"):  # a starting worker has not connected yet
            return False
        try:
            self.control.send(rank, msg)
        except ControlError as e:
            self._death(w, str(e), [])
            return False
        w.last_sent = time.monotonic()
        return True

    def _poll(self, timeout_s: float, wake_fd: int | None = None, outputs: list[RequestOutput] | None = None) -> None:
        outputs = outputs if outputs is not None else []
        poller = zmq.Poller()
        poller.register(self.control.socket, zmq.POLLIN)
        for w in self.workers.values():
            if w.pidfd is not None and w.state != "dead":
                poller.register(w.pidfd, zmq.POLLIN)
        if wake_fd is not None:
            poller.register(wake_fd, zmq.POLLIN)
        poller.poll(int(timeout_s * 1000))
        now = time.monotonic()
        for rank, _, msg in self.control.recv_all():
            w = self.workers[rank]
            w.last_seen = now
            self._handle(w, msg, outputs)

    def _handle(self, w: WorkerState, msg: Any, outputs: list[RequestOutput]) -> None:
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, StageDone):
            inst = next((i for i in self.instances.values() if msg.step_id in i.flights), None)
            if inst is not None and inst.commits(msg):
                outputs.extend(inst.commit(msg))
            elif inst is not None:
                inst.observe_stage(msg)  # a stage before the last
        elif isinstance(msg, Hello):
            if w.state == "ready":
                self._death(w, "it started again", outputs)
            if w.local and msg.pid != w.pid:
                return  # a stale process of this rank, about to be killed
            w.pid, w.host, w.state = msg.pid, msg.host, "loading"
            self.send(w.rank, self._assignment(w.rank))
        elif isinstance(msg, Ready):
            w.ready, w.state = msg, "ready"
        elif isinstance(msg, Reformed):
            w.generation = msg.generation
        elif isinstance(msg, WorkerFailed):
            self._death(w, msg.message, outputs)
        elif isinstance(msg, (TransferDone, TransferFailed)):
            if self.elastic is not None and self.elastic.on_transfer(msg):
                return
            if self.migrator is not None:
                self.migrator.on_transfer(msg)
        elif isinstance(msg, StepFailed):
            inst = next((i for i in self.instances.values() if msg.step_id in i.flights), None)
            if inst is not None:
                log.warning("instance %d: step failed on worker %d: %s", inst.id, msg.rank, msg.message)
                self._fail_instance(inst, outputs)

    def _watch(self, outputs: list[RequestOutput]) -> None:
        """Deaths (exits, silence), restarts, and bringing restarted instances back."""
        now = time.monotonic()
        for w in self.workers.values():
            if w.state == "dead":
                continue
            # Until it has connected (importing torch), a worker has join_timeout; then heartbeats.
            silence = self.options.join_timeout if w.state == "starting" else self.options.heartbeat_timeout
            if w.local and launch.exited(w):
                self._death(w, f"its process exited with status {w.popen.returncode}", outputs)  # type: ignore[union-attr]
            elif now - w.last_seen > silence:
                self._death(w, f"no heartbeat for {now - w.last_seen:.1f} s", outputs)
            elif now - w.last_sent > PING_S:
                self.send(w.rank, Ping())
        if any(s in DOWN for s in self.states.values()):
            self._recover()

    def _death(self, w: WorkerState, why: str, outputs: list[RequestOutput]) -> None:
        if w.state == "dead":
            return
        log.error("worker %d (pid %s) is dead: %s", w.rank, w.pid, why)
        was_ready = w.state == "ready"
        w.state, w.why, w.generation = "dead", why, -1
        w.deaths += 1
        launch.kill(w)
        w.close()
        self.counters["num_worker_deaths_total"] += 1
        if self.migrator is not None:
            self.migrator.on_death(w.rank)
        for inst in list(self.instances.values()):
            if any(m.rank == w.rank for m in inst.members):
                self.events.append(ClusterEvent(time.time(), "worker_death", inst.id, f"worker {w.rank}: {why}"))
                self._fail_instance(inst, outputs)
        if not self.instances and not was_ready:
            return  # during bring-up the caller reports it
        if w.local and self.options.restart_workers:
            self._spawn(w)

    def _fail_instance(self, inst: Instance, outputs: list[RequestOutput]) -> None:
        if self.elastic is not None:
            self.elastic.on_instance_failed(inst.id)
        failed = inst.fail("error")
        if failed:
            log.error("instance %d: %d request(s) ended with an error", inst.id, len(failed))
        outputs.extend(failed)
        self.states[inst.id] = "degraded"

    def _recover(self) -> None:
        recovery.recover(self)

    # ------------------------------------------------------------------ reporting

    def stats(self) -> EngineStats:
        return report.cluster_stats(self)

    def _page_bytes(self) -> int:
        return next((w.ready.page_bytes for w in self.workers.values() if w.ready), 0)

    def take_timings(self) -> list[StepTiming]:
        return [msgspec.structs.replace(t, instance=i.id) for i in self.instances.values() for t in i.take_timings()]

    def record_batches(self) -> None:
        """Every StepTiming from now on carries its batch (--step-log), in every instance,
        those made by a merge or a split too."""
        self._record_batches = True
        for inst in self.instances.values():
            inst.record_batches = True

    def take_events(self) -> list[ClusterEvent]:
        out, self.events = self.events, []
        for inst in self.instances.values():
            out += inst.take_events()
        if self.migrator is not None:
            out += self.migrator.take_events()
        return sorted(out, key=lambda e: e.time) if len(out) > 1 else out

    def take_moved(self) -> list[tuple[str, int]]:
        out, self.moved = self.moved, []
        return out

    # ------------------------------------------------------------------ the end

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self.workers.values():
            if w.state != "dead":
                try:
                    self.control.send(w.rank, Shutdown())
                except ControlError:
                    pass
        for w in self.workers.values():
            launch.stop(w, timeout_s)
        self.control.close()


def _builtins(opts: EngineOptions) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()}


def _advertised(addr: str) -> str:
    import socket

    return socket.gethostbyname(socket.gethostname()) if addr == "0.0.0.0" else addr

