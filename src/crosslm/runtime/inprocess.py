"""In-process runtime: all clients and the server in one Python process, ordered by a seeded virtual clock.

Asynchrony is real even here: each client has a compute-speed factor and a network delay, so uploads
arrive interleaved, the server handles them one by one in arrival order, and later uploads are stale.
Messages cross between client and server only as serialized wire bytes, exactly as a network transport
would carry them.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crosslm import interrupts
from crosslm.client.client import ClientBase
from crosslm.config import ClientConfig, FederationConfig
from crosslm.progress import progress
from crosslm.protocol import WireMessage
from crosslm.server.server import CrossLMServer


@dataclass(order=True)
class _Event:
    t: float
    seq: int
    kind: str = field(compare=False)  # "start" | "arrive" | "server_done" | "deliver"
    client: str = field(compare=False, default="")
    payload: Any = field(compare=False, default=None)


class InProcessRuntime:
    def __init__(
        self,
        clients: list[ClientBase],
        server: CrossLMServer,
        clients_cfg: ClientConfig,
        fed: FederationConfig,
        *,
        log: Callable[[dict[str, Any]], None],
        clock: Callable[[float], None],
        seed: int,
    ):
        self.clients = {c.client_id: c for c in clients}
        self.server = server
        self.fed = fed
        self.log = log
        self.set_clock = clock
        self.rng = random.Random(seed)
        self.speed = {
            c.client_id: float(clients_cfg.speeds[i % len(clients_cfg.speeds)]) for i, c in enumerate(clients)
        }
        delays = clients_cfg.network_delays or [0.0]
        self.delay = {c.client_id: float(delays[i % len(delays)]) for i, c in enumerate(clients)}
        self._queue: list[_Event] = []
        self._seq = itertools.count()
        self.server_busy = False

    def _push(self, t: float, kind: str, client: str = "", payload: Any = None) -> None:
        heapq.heappush(self._queue, _Event(t, next(self._seq), kind, client, payload))

    def _train_time(self, cid: str) -> float:
        c = self.clients[cid]
        base = self.speed[cid] * self.fed.time_per_example * len(c.data.train) * c.cfg.epochs
        return base * self.rng.uniform(0.9, 1.1)  # seeded jitter

    def _maybe_start_update(self, t: float) -> None:
        if self.server_busy or not self.server.ready() or self.server.update >= self.fed.updates:
            return
        self.server_busy = True
        responses = self.server.step()  # computed now; its results leave the server when it is done
        self.bar.update(1)
        self._push(t + self.fed.server_update_time, "server_done", payload=responses)

    def run(self) -> None:
        for cid in self.clients:
            self._push(0.0, "start", cid)
        self.bar = progress(total=self.fed.updates, desc="CrossLM server updates", unit="update")
        try:
            self._loop()
        finally:
            self.bar.close()

    def _loop(self) -> None:
        while self._queue:
            interrupts.check()
            ev = heapq.heappop(self._queue)
            self.set_clock(ev.t)
            if ev.kind == "start":
                if self.server.update >= self.fed.updates:
                    continue  # the run is over for this client
                wire, event = self.clients[ev.client].local_round()
                self.log(event)
                arrival = ev.t + self._train_time(ev.client) + self.delay[ev.client]
                self._push(arrival, "arrive", ev.client, wire.to_bytes())
            elif ev.kind == "arrive":
                if self.server.update >= self.fed.updates:
                    continue
                wire = WireMessage.from_bytes(ev.payload, max_bytes=self.server.max_bytes)
                self.log({"client": ev.client, **self.server.receive(wire, sender=ev.client)})
                self._maybe_start_update(ev.t)
            elif ev.kind == "server_done":
                self.server_busy = False
                for cid, wire in ev.payload:
                    self._push(ev.t + self.delay[cid], "deliver", cid, wire.to_bytes())
                self._maybe_start_update(ev.t)
            elif ev.kind == "deliver":
                wire = WireMessage.from_bytes(ev.payload, max_bytes=self.server.max_bytes)
                self.log({**self.clients[ev.client].receive_enhanced(wire), "bytes": len(wire)})
                self._push(ev.t, "start", ev.client)
