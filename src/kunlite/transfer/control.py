"""The control plane: typed msgspec messages (msgpack) between the coordinator and its workers
over ZeroMQ, on loopback or across nodes. Nothing is ever pickled.

The coordinator binds one ROUTER socket; each worker connects a DEALER whose identity names its
rank ("w3"), and a second one for heartbeats ("h3") that a thread of the worker writes while
its main thread computes. ROUTER_HANDOVER lets a restarted worker take its rank's identity
over; ROUTER_MANDATORY makes a send to a worker that is not connected an error, not a silent
drop. Every receive takes a timeout.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec
import zmq

In = TypeVar("In")
Out = TypeVar("Out")


class ControlError(RuntimeError):
    pass


def worker_identity(rank: int, heartbeat: bool = False, service: bool = False) -> bytes:
    """The socket identities of a worker: "w3" (its main loop), "h3" (heartbeats), "s3" (its
    remote-attention server)."""
    return f"{'h' if heartbeat else 's' if service else 'w'}{rank}".encode()


def parse_identity(identity: bytes) -> tuple[int, bool]:
    """(rank, is_heartbeat) of a worker's socket identity."""
    text = identity.decode()
    return int(text[1:]), text[0] in "hs"


class ControlServer(Generic[In]):
    """The coordinator's end: receives `In` messages from workers, sends any message to one."""

    def __init__(self, host: str, port: int, message_type: Any) -> None:
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            if port:
                self.socket.bind(f"tcp://{host}:{port}")
                self.port = port
            else:
                self.port = self.socket.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as e:
            self.socket.close()
            raise ControlError(f"cannot bind the control port {host}:{port}: {e}") from None
        self.address = f"tcp://{host}:{self.port}"
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(message_type)

    def send(self, rank: int, msg: Any, *, service: bool = False) -> None:
        try:
            self.socket.send_multipart([worker_identity(rank, service=service), self._encoder.encode(msg)],
                                       flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise ControlError(f"cannot reach worker {rank}: {e}") from None

    def recv_all(self) -> list[tuple[int, bool, In]]:
        """Every message waiting now: (rank, came on the heartbeat socket, message)."""
        out = []
        while True:
            try:
                identity, payload = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return out
            rank, heartbeat = parse_identity(identity)
            out.append((rank, heartbeat, self._decoder.decode(payload)))

    def close(self) -> None:
        self.socket.close(linger=0)


class ControlClient(Generic[Out]):
    """A worker's end: receives `Out` messages from the coordinator."""

    def __init__(self, address: str, rank: int, message_type: Any, *, heartbeat: bool = False,
                 service: bool = False) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, worker_identity(rank, heartbeat, service))
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.connect(address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(message_type)

    def send(self, msg: Any) -> None:
        self.socket.send(self._encoder.encode(msg))

    def recv(self, timeout_s: float) -> Out | None:
        """The next message, or None after `timeout_s` seconds."""
        if not self.socket.poll(int(timeout_s * 1000)):
            return None
        return self._decoder.decode(self.socket.recv())

    def close(self) -> None:
        self.socket.close()
