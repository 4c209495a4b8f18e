"""Programmatic start/stop of a local Flower 1.42 deployment (SuperLink + N SuperNodes).

Used by launch.py (end-to-end run + measurements) and fault_test.py.
Only the public CLIs are used: flower-superlink, flower-supernode, flwr.

Process model (flwr 1.42, default `--isolation subprocess`):
  flower-superlink  -> spawns `flower-superexec` (own session!) -> spawns `flwr-serverapp` per run
  flower-supernode  -> spawns `flower-superexec` (same group)  -> spawns `flwr-clientapp` per MESSAGE
Each superexec watches its parent PID (--parent-pid) and exits when the parent dies,
but we still collect all descendants before shutdown and reap stragglers by PID.
"""
from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent          # /work/proto_flower
VENV_BIN = ROOT / "venv" / "bin"
APP_DIR = ROOT / "app"
PKI = ROOT / "pki"


def _descendants(pid: int) -> list[int]:
    """All descendant PIDs of `pid` (walks /proc; no psutil needed)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b")")[-1].split()[0] != b"Z"  # zombie == dead
    except OSError:
        return False


@dataclass
class NodeSpec:
    name: str
    runtime_port: int
    node_config: dict
    key: Path | None = None          # OpenSSH EC private key (auth); pub key = key + ".pub"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    started: float
    extra_pids: list[int] = field(default_factory=list)


class Cluster:
    def __init__(self, workdir: Path, *, port: int = 9093, tls: bool = True,
                 auth: bool = True, database: str | None = None,
                 nodes: list[NodeSpec] | None = None,
                 superexec_poll: float | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.port = port
        self.tls = tls
        self.auth = auth and tls      # flwr: supernode auth requires TLS
        self.database = database
        self.nodes = nodes or []
        self.superexec_poll = superexec_poll
        self.procs: dict[str, Proc] = {}
        self.node_ids: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.cli_home = self.workdir / "home" / "cli"
        self.cli_home.mkdir(parents=True, exist_ok=True)
        self.conn = "proto"
        self._write_cli_config()

    # ------------------------------------------------------------------ helpers
    def _env(self, home: str) -> dict:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.workdir / "home" / home)  # separate app installs
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")     # no telemetry pings
        env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # no PyPI version check at start
        if self.superexec_poll is not None:
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(self.superexec_poll)
        Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
        return env

    def _write_cli_config(self) -> None:
        # flwr 1.42: SuperLink connections live in $FLWR_HOME/config.toml, NOT pyproject
        lines = ["[superlink]", f'default = "{self.conn}"', "",
                 f"[superlink.{self.conn}]", f'address = "127.0.0.1:{self.port}"']
        if self.tls:
            lines.append(f'root-certificates = "{PKI / "ca.crt"}"')  # must be absolute
        else:
            lines.append("insecure = true")
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "flwr"), *args], env=self._env("cli"),
                              capture_output=True, text=True, timeout=timeout,
                              cwd=self.workdir)

    def _spawn(self, name: str, cmd: list[str], home: str) -> Proc:
        log = self.workdir / "logs" / f"{name}.log"
        f = open(log, "ab")
        f.write(f"\n===== {time.ctime()} {' '.join(cmd)}\n".encode())
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self._env(home),
                             cwd=self.workdir, start_new_session=True)
        pr = Proc(name, p, log, time.time())
        self.procs[name] = pr
        return pr

    # --------------------------------------------------------------- superlink
    def superlink_cmd(self) -> list[str]:
        cmd = [str(VENV_BIN / "flower-superlink"), "--port", str(self.port),
               "--disable-runtime-dependency-installation"]   # no `uv sync` per run
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(PKI / "ca.crt"),
                    "--ssl-certfile", str(PKI / "server.pem"),
                    "--ssl-keyfile", str(PKI / "server.key")]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        if self.database:
            cmd += ["--database", self.database]
        return cmd

    def _superlink_up(self) -> bool:
        scheme = "https" if self.tls else "http"
        ctx = ssl.create_default_context(cafile=str(PKI / "ca.crt")) if self.tls else None
        try:
            urllib.request.urlopen(f"{scheme}://127.0.0.1:{self.port}/", timeout=1, context=ctx)
        except urllib.error.HTTPError:
            return True                     # 404 from FastAPI == server is up
        except (urllib.error.URLError, OSError):
            return False
        return True

    def start_superlink(self, timeout: float = 60) -> float:
        t0 = time.time()
        pr = self._spawn("superlink", self.superlink_cmd(), "superlink")
        while not self._superlink_up():
            if pr.popen.poll() is not None:
                raise RuntimeError(f"superlink exited rc={pr.popen.returncode}, see {pr.log}")
            if time.time() - t0 > timeout:
                raise TimeoutError("superlink did not come up")
            time.sleep(0.1)
        self.timings["superlink_start_s"] = time.time() - t0
        return self.timings["superlink_start_s"]

    # ------------------------------------------------------------- supernodes
    def register_nodes(self) -> dict[str, int]:
        """`flwr supernode register <pub> <conn>`; idempotent with a persistent DB."""
        if not self.auth:
            return {}
        t0 = time.time()
        for n in self.nodes:
            pub = Path(str(n.key) + ".pub")
            r = self.flwr("supernode", "register", str(pub), self.conn, "--name", n.name,
                          "--format", "json")
            try:
                self.node_ids[n.name] = int(json.loads(r.stdout)["node-id"])
                continue
            except (ValueError, KeyError, json.JSONDecodeError):
                pass
            if "already in use" not in (r.stdout + r.stderr):
                raise RuntimeError(f"register {n.name} failed: {r.stdout} {r.stderr}")
            # Key already registered (persistent --database): fine. `flwr supernode list
            # --format json` has no name column, the id is read from the SuperNode log.
            self.node_ids[n.name] = -1
        self.timings["register_s"] = time.time() - t0
        return self.node_ids

    def supernode_cmd(self, n: NodeSpec) -> list[str]:
        cmd = [str(VENV_BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
               "--port", str(n.runtime_port)]          # each SuperNode: own Runtime API port
        if self.tls:
            cmd += ["--root-certificates", str(PKI / "ca.crt")]
        else:
            cmd += ["--insecure"]
        if self.auth and n.key:
            cmd += ["--auth-supernode-private-key", str(n.key)]
        if n.node_config:
            cmd += ["--node-config", " ".join(f"{k}={_toml(v)}" for k, v in n.node_config.items())]
        return cmd

    def start_supernode(self, n: NodeSpec, timeout: float = 60, wait: bool = True) -> int | None:
        t0 = time.time()
        pr = self._spawn(n.name, self.supernode_cmd(n), n.name)
        if not wait:
            return None
        with open(pr.log, "rb") as f:
            f.seek(0, 2)
            buf = b""
            while True:
                buf += f.read()
                i = buf.rfind(b"SuperNode ID: ")
                if i >= 0 and b"\n" in buf[i:]:
                    nid = int(buf[i + 14:].split(b"\n")[0].strip().split()[0])
                    self.timings[f"{n.name}_start_s"] = time.time() - t0
                    return nid
                if pr.popen.poll() is not None:
                    raise RuntimeError(f"{n.name} exited rc={pr.popen.returncode}; see {pr.log}")
                if time.time() - t0 > timeout:
                    raise TimeoutError(f"{n.name} did not connect")
                time.sleep(0.1)

    def start_all(self) -> dict:
        self.start_superlink()
        self.register_nodes()
        t0 = time.time()
        ids = {}
        for n in self.nodes:                   # start in parallel, then wait
            self._spawn(n.name, self.supernode_cmd(n), n.name)
        for n in self.nodes:
            ids[n.name] = self._wait_node_id(n, t0)
        self.timings["supernodes_start_s"] = time.time() - t0
        return ids

    def _wait_node_id(self, n: NodeSpec, t0: float, timeout: float = 60) -> int:
        pr = self.procs[n.name]
        while time.time() - t0 < timeout:
            txt = pr.log.read_text(errors="replace").split("=====")[-1]
            if "SuperNode ID: " in txt:
                return int(txt.split("SuperNode ID: ")[-1].split()[0])
            if pr.popen.poll() is not None:
                raise RuntimeError(f"{n.name} exited rc={pr.popen.returncode}; see {pr.log}")
            time.sleep(0.1)
        raise TimeoutError(n.name)

    # ------------------------------------------------------------------- runs
    def run_app(self, run_config: dict) -> int:
        cfg = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        t0 = time.time()
        r = self.flwr("run", str(APP_DIR), self.conn, "--run-config", cfg, "--format", "json")
        self.timings["flwr_run_submit_s"] = time.time() - t0
        try:
            return int(json.loads(r.stdout)["run-id"])
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"flwr run failed: {r.stdout}\n{r.stderr}") from e

    def run_status(self, run_id: int) -> str:
        r = self.flwr("list", self.conn, "--run-id", str(run_id), "--format", "json")
        try:
            return json.loads(r.stdout)["runs"][0]["status"]
        except Exception:  # noqa: BLE001
            return "unknown"

    def wait_run(self, run_id: int, timeout: float = 900, poll: float = 3.0) -> str:
        t0 = time.time()
        while time.time() - t0 < timeout:
            st = self.run_status(run_id)
            if st.startswith("finished"):
                return st
            time.sleep(poll)
        self.flwr("stop", str(run_id), self.conn)
        return "timeout(stopped)"

    # --------------------------------------------------------------- shutdown
    def kill(self, name: str, sig: int = signal.SIGTERM, wait: float = 15) -> float:
        """Signal a component's whole process group; escalate to SIGKILL; reap strays."""
        pr = self.procs.get(name)
        if pr is None or pr.popen.poll() is not None:
            return 0.0
        t0 = time.time()
        desc = _descendants(pr.popen.pid)     # superexec/app pids (may be in other sessions)
        try:
            os.killpg(pr.popen.pid, sig)
        except ProcessLookupError:
            pass
        try:
            pr.popen.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            os.killpg(pr.popen.pid, signal.SIGKILL)
            pr.popen.wait(timeout=5)
        # superexec exits by itself (parent monitor) - give it a moment, then force
        deadline = time.time() + (3 if sig != signal.SIGKILL else 0)
        while time.time() < deadline and any(_alive(p) for p in desc):
            time.sleep(0.1)
        for p in desc:
            if _alive(p) and sig != signal.SIGKILL:
                try:
                    os.kill(p, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        return time.time() - t0

    def stop_all(self) -> float:
        t0 = time.time()
        for n in self.nodes:
            self.kill(n.name)
        self.kill("superlink")
        self.timings["shutdown_s"] = time.time() - t0
        return self.timings["shutdown_s"]


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))   # TOML basic string
