"""Deployment helpers: certificates and node keys, `flwr run` submission, and the loopback deployment.

The loopback deployment (`crosslm flower local`) starts what a real deployment runs on separate
machines: one `flower-superlink` (TLS, SuperNode authentication, SQLite state) and one
`flower-supernode` per client, each with its own node config, Flower home and log file. It submits
the CrossLM app with `flwr run`, follows the run, and stops every process it started, on success,
failure and Ctrl-C alike. docs/deploy-flower.md shows the same steps across machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosslm.config import RunConfig, config_from_dict
from crosslm.errors import ConfigError, CrossLMError
from crosslm.io import atomic_write_text
from crosslm.task import TaskSpec

APP_DIR = Path(__file__).resolve().parent / "app"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr come with the flwr package


# ------------------------------------------------------------------------------------ certificates
def generate_pki(
    out: Path, node_names: list[str], hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
) -> Path:
    """A throw-away CA, a SuperLink certificate for `hosts`, and one EC P-384 OpenSSH key pair per node.

    For loopback runs and trials only: production deployments use certificates from their own CA.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    valid = (now - dt.timedelta(minutes=5), now + dt.timedelta(days=30))
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crosslm throw-away CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def pem(k: Any) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    def write(name: str, data: bytes, mode: int) -> None:
        (out / name).write_bytes(data)
        (out / name).chmod(mode)

    write("ca.key", pem(ca_key), 0o600)
    write("ca.crt", ca.public_bytes(serialization.Encoding.PEM), 0o644)
    write("server.key", pem(key), 0o600)
    write("server.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    for name in node_names:
        node_key(out, name)
    return out


def node_key(out: Path, name: str) -> Path:
    """An EC P-384 key pair in OpenSSH format: `<name>` (private, stays on the node) and `<name>.pub`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP384R1())
    priv = k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (out / name).write_bytes(priv)
    (out / name).chmod(0o600)
    (out / f"{name}.pub").write_bytes(pub + f" {name}\n".encode())
    return out / name


# ------------------------------------------------------------------------------------- run config
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_run_config(path: Path, cfg: RunConfig, task: TaskSpec, run_dir: Path) -> Path:
    """The `flwr run --run-config` file: the resolved config and the task, as JSON strings."""
    values = {
        "crosslm-config": json.dumps(cfg.to_dict()),
        "task": json.dumps(dataclasses.asdict(task)),
        "run-dir": str(Path(run_dir).resolve()),
    }
    atomic_write_text(path, "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    return path


def write_connection(home: Path, conn: str, address: str, root_certificates: Path | None) -> None:
    """The `flwr` CLI's connection to a SuperLink, in `$FLWR_HOME/config.toml` (TLS unless no CA is given)."""
    lines = ["[superlink]", f'default = "{conn}"', "", f"[superlink.{conn}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def run_id_of(result: subprocess.CompletedProcess) -> int:
    """The run id printed by `flwr run --format json`, or a clear error with what flwr said."""
    try:
        return int(json.loads(result.stdout)["run-id"])
    except (ValueError, KeyError, json.JSONDecodeError):
        raise CrossLMError(f"flwr run failed: {(result.stdout + result.stderr).strip()[-800:]}") from None


def read_run_config(run_config: dict[str, Any]) -> RunConfig:
    """The resolved config that `write_run_config` put in a run's Flower run config (server and clients)."""
    try:
        data = json.loads(str(run_config["crosslm-config"]))
    except (KeyError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"run config lacks a valid 'crosslm-config' ({e}); submit with crosslm flower"
        ) from None
    return config_from_dict(data, "run config 'crosslm-config'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (state first), or None when there is no process."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        stat = _proc_stat(int(d))
        if stat is None or len(stat) < 2:
            continue
        children.setdefault(int(stat[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time): a pid is reused by the kernel, the pair is not."""
    stat = _proc_stat(pid)
    return (pid, stat[19]) if stat and len(stat) > 19 else None


def _alive(proc: int | tuple[int, str]) -> bool:
    """A running (not zombie) process; given an `_identity`, the same process that was recorded."""
    pid, start = proc if isinstance(proc, tuple) else (proc, None)
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z" and (start is None or (len(stat) > 19 and stat[19] == start))


def _signal(proc: tuple[int, str], sig: int) -> None:
    if _alive(proc):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc[0], sig)


@dataclass
class NodeSpec:
    name: str
    node_config: dict[str, Any]
    key: Path | None = None  # the node's private key (SuperNode authentication)
    port: int = field(default_factory=free_port)  # the node's local ClientApp I/O port


class LocalDeployment:
    """A SuperLink and SuperNodes as real processes on this machine, all in one process group.

    Flower starts helpers of its own (each SuperNode's and the SuperLink's `flower-superexec`, the
    ServerApp), some in sessions of their own; `track` records every process each component started, so
    a component that dies (a crashed SuperNode) does not leave them running, and `stop_all` ends the
    group and every recorded process."""

    def __init__(self, workdir: Path, *, tls: bool = True, port: int = 0, pki: Path | None = None):
        self.workdir = Path(workdir).resolve()
        self.tls = tls
        self.port = port or free_port()
        self.pki = Path(pki).resolve() if pki else self.workdir / "pki"
        self.procs: dict[str, tuple[subprocess.Popen, set[tuple[int, str]]]] = {}
        self.pgid: int | None = None  # the deployment's process group
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.conn = "crosslm-local"
        home = self.workdir / "home" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        write_connection(home, self.conn, f"127.0.0.1:{self.port}", self.pki / "ca.crt" if tls else None)

    def env(self, home: str) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.workdir / "home" / home)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env.update(PYTHONUNBUFFERED="1", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
        return env

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env("cli"), capture_output=True, text=True, timeout=timeout,
            cwd=self.workdir,
        )  # fmt: skip

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        log.write(f"\n===== {time.ctime()} {' '.join(cmd)}\n".encode())
        log.flush()
        group = self.pgid if self._group_alive() else None
        p = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(name),
            cwd=self.workdir,
            # one process group (in this session), led by the first process and apart from the
            # terminal's: Ctrl-C reaches crosslm alone, which then stops them all in order
            preexec_fn=lambda: os.setpgid(0, group or 0),  # noqa: PLW1509
        )
        log.close()
        if group is None:
            self.pgid = p.pid
        self.procs[name] = (p, set())
        return p

    def _group_alive(self) -> bool:
        if self.pgid is None:
            return False
        for p, _ in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                if p.poll() is None and os.getpgid(p.pid) == self.pgid:
                    return True
        return False

    def track(self) -> list[str]:
        """Record every process each running component has started; for a component that has died, end
        what it left behind. Returns the names of the components found dead."""
        dead = []
        for name, (p, known) in self.procs.items():
            if p.poll() is None:
                known.update(i for i in map(_identity, _descendants(p.pid)) if i is not None)
                continue
            left = [k for k in known if _alive(k)]
            for k in left:
                _signal(k, signal.SIGKILL)
            if left or known:
                dead.append(name)
            known.clear()
        return dead

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace").split("\n===== ")[-1] if path.exists() else ""

    # -- SuperLink -----------------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 90) -> None:
        cmd = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--database", str(self.workdir / "superlink.db"), "--disable-runtime-dependency-installation"]  # fmt: skip
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(self.pki / "ca.crt"), "--ssl-certfile", str(self.pki / "server.pem"),
                    "--ssl-keyfile", str(self.pki / "server.key"), "--enable-supernode-auth"]  # fmt: skip
        else:
            cmd += ["--insecure"]
        p = self.spawn("superlink", cmd)
        t0 = time.monotonic()
        while not self._superlink_up():
            if p.poll() is not None:
                raise CrossLMError(
                    f"flower-superlink exited with {p.returncode}: {self.log_text('superlink')[-800:]}"
                )
            if time.monotonic() - t0 > timeout:
                raise CrossLMError(
                    f"flower-superlink did not answer on port {self.port} within {timeout:.0f} s"
                )
            time.sleep(0.2)

    def _superlink_up(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt")) if self.tls else None
        try:
            urllib.request.urlopen(
                f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/", timeout=2, context=ctx
            )
        except urllib.error.HTTPError:
            return True  # the API answers (404 on /): it is up
        except (urllib.error.URLError, OSError):
            return False
        return True

    def register(self, pub_key: Path, name: str) -> None:
        """`flwr supernode register`: only nodes whose public key is registered may join."""
        r = self.flwr("supernode", "register", str(pub_key), self.conn, "--name", name, "--format", "json")
        if "node-id" not in r.stdout and "already in use" not in r.stdout + r.stderr:
            raise CrossLMError(
                f"registering node key '{pub_key}' failed: {(r.stdout + r.stderr).strip()[-600:]}"
            )

    # -- SuperNodes ----------------------------------------------------------------------------------
    def start_node(self, spec: NodeSpec) -> subprocess.Popen:
        cmd = [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(spec.port),
        ]
        if self.tls:
            cmd += ["--root-certificates", str(self.pki / "ca.crt")]
            if spec.key is not None:
                cmd += ["--auth-supernode-private-key", str(spec.key)]
        else:
            cmd += ["--insecure"]
        cmd += ["--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in spec.node_config.items())]
        return self.spawn(spec.name, cmd)

    def start(self, nodes: list[NodeSpec]) -> None:
        """SuperLink, node registration, SuperNodes; returns once every node has connected."""
        self.start_superlink()
        for n in nodes:
            if self.tls and n.key is not None:
                self.register(n.key.with_name(f"{n.key.name}.pub"), n.name)
            self.start_node(n)
        for n in nodes:
            self.wait_node(n.name)

    def wait_node(self, name: str, timeout: float = 90) -> int:
        """The node id once the SuperNode has connected; raises if it exits (e.g. refused) first."""
        p = self.procs[name][0]
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            text = self.log_text(name)
            if "SuperNode ID: " in text:
                return int(text.split("SuperNode ID: ")[-1].split()[0])
            if p.poll() is not None:
                raise CrossLMError(f"SuperNode '{name}' exited with {p.returncode}: {text.strip()[-600:]}")
            time.sleep(0.2)
        raise CrossLMError(f"SuperNode '{name}' did not connect within {timeout:.0f} s")

    # -- runs ----------------------------------------------------------------------------------------
    def submit(self, run_config: Path, app_dir: Path = APP_DIR) -> int:
        return run_id_of(
            self.flwr("run", str(app_dir), self.conn, "--run-config", str(run_config), "--format", "json")
        )

    def status(self, run_id: int) -> str:
        r = self.flwr("list", self.conn, "--run-id", str(run_id), "--format", "json")
        try:
            return str(json.loads(r.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError, json.JSONDecodeError):
            return "unknown"

    def wait(
        self, run_id: int, *, timeout: float, poll: float = 3.0, on_poll: Callable[[], None] | None = None
    ) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = self.status(run_id)
            if st.startswith("finished"):
                return st
            self.track()
            if on_poll:
                on_poll()
            time.sleep(poll)
        self.flwr("stop", str(run_id), self.conn)
        return "timeout"

    def server_log(self, run_id: int) -> str:
        r = self.flwr("log", str(run_id), self.conn, "--show", timeout=60)
        return r.stdout + r.stderr

    # -- shutdown ------------------------------------------------------------------------------------
    def kill(self, name: str, sig: int = signal.SIGTERM, wait: float = 15) -> None:
        """Signal one component and every process it started; SIGKILL what is still there after `wait`."""
        entry = self.procs.get(name)
        if entry is None:
            return
        p, known = entry
        if p.poll() is None:
            known.update(i for i in map(_identity, _descendants(p.pid)) if i is not None)
        procs = [i for i in [_identity(p.pid), *known] if i is not None]
        for i in procs:
            _signal(i, sig)
        self._wait_gone(procs, 0 if sig == signal.SIGKILL else wait)
        p.poll()
        known.clear()

    @staticmethod
    def _wait_gone(procs: list[tuple[int, str]], wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(i) for i in procs):
            time.sleep(0.1)
        for i in procs:
            _signal(i, signal.SIGKILL)

    def stop_all(self, wait: float = 20) -> None:
        """SIGTERM the group and every recorded process (the ServerApp closes its run on it), then SIGKILL
        whatever is left after `wait` seconds."""
        self.track()
        procs: list[tuple[int, str]] = []
        for p, known in self.procs.values():
            procs += [i for i in [_identity(p.pid), *known] if i is not None]
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGTERM)
        for i in procs:
            _signal(i, signal.SIGTERM)
        self._wait_gone(procs, wait)
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
        for p, known in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
            known.clear()


# -------------------------------------------------------------------------------- the one command
def loopback(cfg: RunConfig, run_dir: Path) -> tuple[LocalDeployment, list[NodeSpec]]:
    """The loopback deployment of `cfg` (certificates and keys made, nothing started yet)."""
    fl = Path(run_dir) / "flower"
    names = [f"client-{k}" for k in range(cfg.data.num_clients)]
    tls = not cfg.flower.insecure
    if tls and not all((fl / "pki" / n).is_file() for n in ["ca.crt", *names]):  # a resumed run keeps its own
        generate_pki(fl / "pki", names)
    dep = LocalDeployment(fl, tls=tls, port=cfg.flower.port)
    specs = [
        NodeSpec(name, loopback_node_config(cfg, run_dir, k), fl / "pki" / name if tls else None)
        for k, name in enumerate(names)
    ]
    return dep, specs


def loopback_node_config(cfg: RunConfig, run_dir: Path, k: int) -> dict[str, Any]:
    """Node config of simulated client k: its partition, its own work dir, its speed."""
    delays = cfg.flower.node_delays or [0.0]
    work = Path(run_dir) / "nodes" / f"client-{k}"
    node: dict[str, Any] = {
        "partition-id": k,
        "work-dir": str(work),
        "delay": float(delays[k % len(delays)]),
        "threads": cfg.flower.threads_per_node,
    }
    if cfg.flower.audit_outbox:
        node["outbox-audit-dir"] = str(work / "outbox-audit")
    return node


def run_local(cfg: RunConfig, resume: Path | None = None) -> Path:
    """`crosslm flower local`: the whole CrossLM run on a loopback Flower deployment. With `resume` (a run
    directory whose `flower local` was killed or interrupted), the same nodes, keys and SuperLink state
    come back and the ServerApp continues from the run's checkpoint."""
    from crosslm.evaluation.report import summary_table, write_report
    from crosslm.io import read_jsonl
    from crosslm.lifecycle import check_runtime, close_stopped_run, make_run_dir, prepare_data
    from crosslm.progress import progress

    check_runtime(cfg, "flower")
    task, _ = prepare_data(cfg)  # fails early, with a clear message, on a bad dataset
    run_dir = Path(resume).resolve() if resume else make_run_dir(cfg).resolve()
    fl = run_dir / "flower"
    if resume:  # a fresh SuperLink state: the old one still counts the killed nodes as connected and would
        # refuse their keys until its heartbeat deadline; the ServerApp resumes from the run's checkpoint
        for f in fl.glob("superlink.db*"):
            f.unlink()
    dep, specs = loopback(cfg, run_dir)
    run_config = write_run_config(fl / "run_config.toml", cfg, task, run_dir)
    status, run_id = "not started", -1
    metrics = run_dir / "metrics.jsonl"
    try:
        dep.start(specs)
        run_id = dep.submit(run_config)
        bar = progress(
            total=cfg.federation.updates, desc=f"CrossLM over Flower (run {run_id})", unit="update"
        )

        def show_progress() -> None:
            if metrics.exists():
                done = sum(1 for e in read_jsonl(metrics) if e.get("event") == "server_update")
                bar.update(max(done - bar.n, 0))

        status = dep.wait(run_id, timeout=24 * 3600, on_poll=show_progress)
        show_progress()
        bar.close()
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if run_id >= 0:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                atomic_write_text(fl / "logs" / "serverapp.log", dep.server_log(run_id))
        dep.stop_all()  # SIGTERM first: a running ServerApp closes its run itself
        if status != "finished:completed" and metrics.exists():
            close_stopped_run(run_dir, cfg, reason="interrupted" if status == "interrupted" else "error")
            print(f"\nresume this run with: crosslm flower local --resume {run_dir}", file=sys.stderr)
    if status != "finished:completed":
        raise CrossLMError(
            f"the Flower run ended as '{status}'; see {fl / 'logs'} (serverapp.log, superlink.log, client-*.log)"
        )
    # loopback only: every node's disk is this disk, so collect the final SLMs where `crosslm run` puts them
    for spec in specs:
        src = run_dir / "nodes" / spec.name / "model"
        if src.is_dir():
            shutil.copytree(src, run_dir / "clients" / spec.name, dirs_exist_ok=True)
    events = read_jsonl(metrics)
    write_report(run_dir, events, cfg.to_dict())
    print(summary_table(events))
    print(f"\nrun directory: {run_dir}\nreport: {run_dir / 'report.md'}")
    return run_dir


def submit_run(
    cfg: RunConfig,
    task: TaskSpec,
    run_dir: Path,
    superlink: str,
    root_certificates: str | None,
    insecure: bool,
) -> int:
    """`crosslm flower submit`: submit the CrossLM app to a running SuperLink (another machine's too)."""
    home = Path(run_dir).expanduser().resolve().parent / f".{Path(run_dir).name}.flwr"
    home.mkdir(parents=True, exist_ok=True)
    conn = "crosslm"
    ca = None
    if not insecure:
        ca = Path(str(root_certificates)).expanduser().resolve()
        if not ca.is_file():
            raise CrossLMError(f"--root-certificates '{ca}' does not exist")
    write_connection(home, conn, superlink, ca)
    rc = write_run_config(home / "run_config.toml", cfg, task, Path(run_dir).expanduser())
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    r = subprocess.run(
        [str(BIN / "flwr"), "run", str(APP_DIR), conn, "--run-config", str(rc), "--format", "json"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return run_id_of(r)
