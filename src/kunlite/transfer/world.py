"""Joining the devices into one torch.distributed world, through the standard environment
rendezvous (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK: the variables torchrun
sets), and forming it again after a worker died.

The key-value store lives with the coordinator, as torchrun's elastic agent keeps it: it
outlives any worker, so that a restarted worker can join again. Workers connect to it as
clients. The world is formed in *generations*: generation g is a process group over a prefix
"kunlite/gen{g}/" of the store. When a worker dies, its peers' connections to it are closed
(gloo raises at once), the coordinator restarts it, and every worker leaves generation g and
joins g + 1 at a moment when none is inside a transfer. Nothing here is a cluster layer of our
own: it is torch.distributed's store, process groups and P2P, used as documented.

Everything that calls torch.distributed lives in `transfer/`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

STORE_KEY_CONTROL = "kunlite/control"  # the coordinator's control-plane address, for workers


class RendezvousError(RuntimeError):
    """A worker could not join: the store or a peer did not answer in time (the message names
    the rank and the address)."""


@dataclass(frozen=True)
class Rendezvous:
    master_addr: str
    master_port: int
    world_size: int
    rank: int
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Rendezvous":
        try:
            return cls(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                       int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))
        except KeyError as e:
            raise RendezvousError(f"the environment lacks {e.args[0]} (set MASTER_ADDR, MASTER_PORT, "
                                  "WORLD_SIZE and RANK, as torchrun does)") from None

    def env(self) -> dict[str, str]:
        return {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
                "WORLD_SIZE": str(self.world_size), "RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank)}


def host_store(addr: str, port: int, timeout_s: float) -> dist.TCPStore:
    """The coordinator's store (the master side); raises OSError-like errors for a port in use."""
    return dist.TCPStore(addr, port, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def connect_store(rdzv: Rendezvous, timeout_s: float) -> dist.TCPStore:
    try:
        return dist.TCPStore(rdzv.master_addr, rdzv.master_port, is_master=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # torch raises DistNetworkError / RuntimeError / TimeoutError
        raise RendezvousError(f"rank {rdzv.rank} could not reach the store at {rdzv.master_addr}:"
                              f"{rdzv.master_port} within {timeout_s:.0f} s: {e}") from None


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


class World:
    """This process's membership in the current generation of the world."""

    def __init__(self, store: dist.TCPStore, rdzv: Rendezvous, device: str, timeout_s: float) -> None:
        self.store = store
        self.rdzv = rdzv
        self.device = torch.device(device)
        self.backend = backend_for(device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.generation: int | None = None

    @property
    def rank(self) -> int:
        return self.rdzv.rank

    def join(self, generation: int) -> None:
        """Form generation `generation` with every other rank (blocks until all have joined, or
        raises RendezvousError after the timeout)."""
        if self.generation is not None:
            self.leave()
        prefix = dist.PrefixStore(f"kunlite/gen{generation}/", self.store)
        try:
            dist.init_process_group(self.backend, store=prefix, rank=self.rdzv.rank,
                                    world_size=self.rdzv.world_size, timeout=self.timeout,
                                    device_id=self.device if self.backend == "nccl" else None)
        except Exception as e:
            raise RendezvousError(f"rank {self.rdzv.rank} could not form generation {generation} of the world "
                                  f"(store {self.rdzv.master_addr}:{self.rdzv.master_port}): {e}") from None
        self.generation = generation

    def leave(self) -> None:
        if self.generation is not None and dist.is_initialized():
            dist.destroy_process_group()
        self.generation = None
