"""Pieces of the Flower runtime that need no processes: records, reports, node config, client state,
resumable logs, checkpoints and the submitted run config."""

from __future__ import annotations

import json

import pytest
import tomllib
import torch
from flwr.app import ConfigRecord, RecordDict

from crosslm.client.client import Client, ClientData
from crosslm.config import ClientConfig, RunConfig
from crosslm.errors import ConfigError, CrossLMError, ProtocolError
from crosslm.io import JsonlWriter, read_jsonl
from crosslm.protocol import WireMessage, validate_report
from crosslm.runtime.flower.client_app import node_settings
from crosslm.runtime.flower.deploy import APP_DIR, write_run_config
from crosslm.runtime.flower.payload import pack, unpack_report, unpack_request, unpack_wire
from crosslm.task import LabelledTexts, TaskSpec

TASK = TaskSpec(
    "toy", ("neg", "pos"), ("negative", "positive"), ("Negative", "Positive"), "W {description}", "{t}"
)


def test_wire_messages_survive_the_flower_records_byte_for_byte():
    wire = WireMessage('{"type": "slm_upload"}', bytes(range(256)) * 40)
    back = unpack_wire(pack(wire=wire), max_bytes=1 << 20)
    assert back.header == wire.header and back.payload == wire.payload
    with pytest.raises(ProtocolError, match="limit"):
        unpack_wire(pack(wire=wire), max_bytes=1000)
    rd = pack(wire=wire)
    rd["smuggled"] = ConfigRecord({"json": "{}"})
    with pytest.raises(ProtocolError, match="undeclared record 'smuggled'"):
        unpack_wire(rd, max_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="report"):
        unpack_wire(pack(wire=wire, report={"event": "enhanced"}), max_bytes=1 << 20)  # not declared here
    bad = RecordDict()
    bad["header"] = ConfigRecord({"json": "[1, 2"})
    with pytest.raises(ProtocolError):
        unpack_wire(bad, max_bytes=1 << 20)
    assert unpack_request(pack(request={"server_update": 3})) == {"server_update": 3}


def test_reports_carry_declared_numbers_only():
    ok = {"event": "client_trained", "client": "c", "round": 2, "base_version": 1, "train_loss": 0.3,
          "seconds": 4.0, "local": {"accuracy": 0.8, "macro_f1": 0.7}}  # fmt: skip
    assert validate_report(ok, client_id="c") == ok
    assert unpack_report(pack(report=ok), "c") == ok
    for bad, why in [
        ({**ok, "text": "a private review"}, "not declared"),
        ({**ok, "local": {"accuracy": 0.8, "sample": 1.0}}, "not a declared metric"),
        ({**ok, "train_loss": "low"}, "finite number"),
        ({**ok, "train_loss": float("nan")}, "finite number"),
        ({**ok, "client": "other"}, "claims client"),
        ({**ok, "event": "hello"}, "not one of"),
        ({**ok, "local": {"accuracy": 0.8}, "global": {"accuracy": [1.0]}}, "finite number"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            validate_report(bad, client_id="c")


def test_node_config_mistakes_name_the_key():
    cfg = RunConfig()
    s = node_settings({"work-dir": "/tmp/w", "partition-id": 2}, cfg)
    assert s.client_id == "client-2" and s.slm == cfg.clients.slms[2] and s.partition_id == 2
    s = node_settings({"work-dir": "/tmp/w", "data-dir": "/d", "client-id": "bank", "slm": "minilm-l3"}, cfg)
    assert s.partition_id is None and str(s.data_dir) == "/d" and s.client_id == "bank"
    for node, key in [
        ({"partition-id": 0}, "work-dir"),
        ({"work-dir": "/w"}, "data-dir"),
        ({"work-dir": "/w", "partition-id": 9}, "partition-id"),
        ({"work-dir": "/w", "partition-id": "0"}, "partition-id"),
        ({"work-dir": "/w", "data-dir": "/d"}, "client-id"),
        ({"work-dir": "/w", "partition-id": 0, "delay": "slow"}, "delay"),
    ]:
        with pytest.raises(ConfigError, match=key):
            node_settings(node, cfg)


def test_client_state_round_trips_through_its_disk(tmp_path, monkeypatch):
    from tests.conftest import make_classifier, make_tokenizer

    monkeypatch.setattr(
        "crosslm.client.client.load_slm",
        lambda slm, labels: (make_classifier("bert", 100), make_tokenizer(False)),
    )
    data = ClientData(LabelledTexts(["good", "bad"] * 4, [1, 0] * 4), LabelledTexts(["ok", "no"], [1, 0]),
                      LabelledTexts())  # fmt: skip
    kw = dict(eval_batch_size=4, max_payload_bytes=1 << 24, seed=0)
    c = Client("c", "tiny", TASK, data, ClientConfig(epochs=1, batch_size=4), **kw)
    assert not c.restore(tmp_path / "model")  # nothing saved yet: a new client
    c.local_round()
    c.base_version = 3
    c.save(tmp_path / "model")
    c2 = Client("c", "tiny", TASK, data, ClientConfig(), **kw)
    assert c2.restore(tmp_path / "model")
    assert (c2.round, c2.base_version, c2.metrics) == (1, 3, c.metrics) and "global" not in c2.metrics
    sd, sd2 = c.model.state_dict(), c2.model.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    other = TaskSpec("t2", ("a", "b"), ("a", "b"), ("A", "B"), "W {description}", "{t}")
    with pytest.raises(CrossLMError, match="fresh work-dir"):
        Client("c", "tiny", other, data, ClientConfig(), **kw).restore(tmp_path / "model")


def test_a_resumed_log_drops_what_came_after_the_checkpoint(tmp_path):
    w = JsonlWriter(tmp_path / "m.jsonl")
    for i in range(5):
        w.write({"i": i})
    w.close()
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"i": 5, "torn')  # a hard kill mid-line
    w = JsonlWriter(tmp_path / "m.jsonl", keep_lines=3)
    assert w.lines == 3
    w.write({"i": "next"})
    w.close()
    assert [e["i"] for e in read_jsonl(tmp_path / "m.jsonl")] == [0, 1, 2, "next"]


def test_the_run_config_carries_config_and_task_as_flwr_reads_it(tmp_path):
    cfg = RunConfig()
    cfg.data.label_descriptions = {"pos": 'a "quoted" \\ and ünïcode description'}
    path = write_run_config(tmp_path / "rc.toml", cfg, TASK, tmp_path / "run")
    rc = tomllib.loads(path.read_text())
    assert set(rc) == {"crosslm-config", "task", "run-dir"}
    assert json.loads(rc["crosslm-config"]) == cfg.to_dict()
    assert tuple(json.loads(rc["task"])["labels"]) == TASK.labels
    from crosslm.runtime.flower.client_app import run_settings

    cfg_back, task_back = run_settings(rc)  # what every node reads back
    assert cfg_back.to_dict() == cfg.to_dict() and task_back == TASK
    with pytest.raises(ConfigError, match="'task'"):
        run_settings({**rc, "task": "[1, 2]"})
    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert set(app["tool"]["flwr"]["app"]["config"]) == set(rc)  # flwr refuses keys the app does not declare


def test_flower_cli_certs_and_submit_mistakes(tmp_path):
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "crosslm.cli", "flower", *args], capture_output=True, text=True
        )

    r = cli("certs", str(tmp_path / "pki"), "--nodes", "bank-a", "--hosts", "server.example.org", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "server.example.org" in names.get_values_for_type(x509.DNSName)
    load_ssh_private_key((tmp_path / "pki" / "bank-a").read_bytes(), None)  # what flower-supernode loads
    assert (tmp_path / "pki" / "bank-a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    r = cli("submit", "--superlink", "127.0.0.1:1", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "--root-certificates is required" in r.stderr
    r = cli(
        "submit",
        "--superlink",
        "127.0.0.1:1",
        "--run-dir",
        str(tmp_path / "r"),
        "--root-certificates",
        "/nope.crt",
    )
    assert r.returncode == 2 and "/nope.crt" in r.stderr and "Traceback" not in r.stderr
    r = cli("local", "--set", "flower.straggler_timeout=-1")
    assert r.returncode == 2 and "flower.straggler_timeout" in r.stderr


def test_a_checkpoint_resumes_only_its_own_run(tmp_path):
    from crosslm.config import load_config, save_config
    from crosslm.runtime.flower.server_app import check_resumable

    cfg = load_config(None, ["federation.updates=3"])
    save_config(cfg, tmp_path / "config.yaml")
    check_resumable(
        tmp_path / "config.yaml", load_config(None, ["federation.updates=3", "flower.poll_interval=2"])
    )
    with pytest.raises(ConfigError, match="differs in 'federation'"):
        check_resumable(tmp_path / "config.yaml", load_config(None, ["federation.updates=4"]))
