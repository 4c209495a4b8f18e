"""The virtual-clock runtime: arrival order, interleaving, staleness, stopping after U updates."""

from __future__ import annotations

from types import SimpleNamespace

from crosslm.config import ClientConfig, FederationConfig
from crosslm.protocol import WireMessage
from crosslm.runtime.inprocess import InProcessRuntime


class FakeClient:
    def __init__(self, cid: str):
        self.client_id = cid
        self.data = SimpleNamespace(train=[0] * 100)
        self.cfg = SimpleNamespace(epochs=1)
        self.round = 0
        self.base = 0

    def local_round(self):
        self.round += 1
        header = f'{{"c": "{self.client_id}", "r": {self.round}, "b": {self.base}}}'
        return WireMessage(header, b"w"), {
            "event": "client_trained",
            "client": self.client_id,
            "round": self.round,
        }

    def receive_enhanced(self, wire):
        import json

        self.base = json.loads(wire.header)["u"]
        return {"event": "enhanced", "client": self.client_id, "update": self.base}


class FakeServer:
    max_bytes = 1000

    def __init__(self):
        self.update = 0
        self.pending: list[dict] = []
        self.handled: list[tuple[str, int, int]] = []  # (client, round, staleness)

    def receive(self, wire, sender=None):
        import json

        h = json.loads(wire.header)
        self.pending.append(h)
        return {"event": "upload", "client": h["c"], "accepted": True, "staleness": self.update - h["b"]}

    def ready(self):
        return bool(self.pending)

    def step(self):
        h = self.pending.pop(0)
        self.update += 1
        self.handled.append((h["c"], h["r"], self.update - 1 - h["b"]))
        return [(h["c"], WireMessage(f'{{"u": {self.update}}}', b"e"))]


def _run(speeds, updates=5, seed=0):
    clients = [FakeClient(f"c{i}") for i in range(len(speeds))]
    server = FakeServer()
    log: list[dict] = []
    rt = InProcessRuntime(
        clients,
        server,
        ClientConfig(speeds=speeds, network_delays=[1.0]),
        FederationConfig(updates=updates, time_per_example=0.1, server_update_time=5.0),
        log=log.append,
        clock=lambda t: None,
        seed=seed,
    )
    rt.run()
    return server, log


def test_fast_client_is_not_blocked_by_slow_one():
    server, _ = _run([1.0, 20.0], updates=15)
    assert server.update == 15
    order = [c for c, _, _ in server.handled]
    # c0 takes ~10 s per round, c1 ~200 s: c0 is handled several times before c1 arrives
    assert order[:3] == ["c0", "c0", "c0"] and "c1" in order
    assert max(s for _, _, s in server.handled) >= 1  # c1 started from the pretrained model: stale


def test_uploads_queue_while_server_busy_and_stop_after_u():
    server, log = _run([1.0, 1.5, 2.0], updates=3)
    assert [c for c, _, _ in server.handled] == ["c0", "c1", "c2"]  # arrival order
    assert [s for _, _, s in server.handled] == [0, 1, 2]  # each waited for the updates before it
    assert sum(1 for e in log if e["event"] == "enhanced") == 3
    assert server.update == 3


def test_event_order_is_seed_reproducible():
    a = _run([1.0, 1.02, 1.04], updates=5, seed=1)[1]
    b = _run([1.0, 1.02, 1.04], updates=5, seed=1)[1]
    assert a == b


def test_a_swallowed_ctrl_c_still_stops_the_run():
    """A KeyboardInterrupt dropped inside a finalizer must not let the run finish as if completed."""
    import os
    import signal

    import pytest

    from crosslm import interrupts

    interrupts.install()
    try:

        class Swallows:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)  # raised inside __del__: Python prints it and drops it

        Swallows()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupts._received = False
