"""pytest fixtures: the real `tern` binary on private loopback ports with its own data dir.

`tern_server(**config)` starts a server (config as nested dicts, e.g.
`tern_server(limits={"message_size": 10000})`, users as `users={"alice": "secret"}`); every
server is SIGKILLed at the end of its test, and its stderr is printed when the test failed.
"""

import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOSTNAME = "tern.test"
READY_TIMEOUT = 60.0


def tern_bin():
    p = os.environ.get("TERN_BIN") or str(REPO / "target" / "debug" / "tern")
    if not Path(p).is_file():
        pytest.fail(f"tern binary not found at {p} (cargo build -p tern, or set TERN_BIN)")
    return p


def free_ports(n):
    """n distinct free ports on 127.0.0.1 below the ephemeral range."""
    ports = set()
    while len(ports) < n:
        p = random.randint(20000, 32000)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            s.close()
        ports.add(p)
    return list(ports)


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # TOML basic strings use JSON-compatible escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def to_toml(cfg):
    out = []
    for table, keys in cfg.items():
        out.append(f"[{table}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
        out.append("")
    return "\n".join(out)


def hash_password(password):
    out = subprocess.run([tern_bin(), "auth", "hash", password], capture_output=True, text=True, check=True)
    h = out.stdout.strip()
    assert h.startswith("$argon2id$"), h
    return h


class TernServer:
    def __init__(self, tmp, config, users):
        self.dir = Path(tmp)
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "tern.toml"
        self.stderr_path = self.dir / "stderr.log"
        self.proc = None
        cfg = {k: dict(v) for k, v in config.items()}
        cfg.setdefault("server", {}).setdefault("hostname", HOSTNAME)
        cfg["server"].setdefault("data_dir", str(self.data_dir))
        if users:
            cfg.setdefault("auth", {})["users"] = [
                {"name": name, "password_hash": hash_password(pw)} for name, pw in users.items()
            ]
        self.base_config = cfg

    def start(self):
        last = ""
        for _ in range(5):
            smtp, sub, subs, http = free_ports(4)
            cfg = {k: dict(v) for k, v in self.base_config.items()}
            s = cfg.setdefault("smtp", {})
            s.setdefault("listen", [f"127.0.0.1:{smtp}"])
            s.setdefault("submission_listen", [f"127.0.0.1:{sub}"])
            s.setdefault("submissions_listen", [f"127.0.0.1:{subs}"])
            cfg.setdefault("http", {}).setdefault("listen", f"127.0.0.1:{http}")
            # These tests inspect the spool: nothing may leave it (no DNS, no bounces).
            cfg.setdefault("delivery", {}).setdefault("enabled", False)
            self.config_path.write_text(to_toml(cfg))
            self.smtp_port = int(s["listen"][0].rsplit(":", 1)[1])
            self.submission_port = int(s["submission_listen"][0].rsplit(":", 1)[1])
            self.submissions_port = int(s["submissions_listen"][0].rsplit(":", 1)[1])
            self.http_port = int(cfg["http"]["listen"].rsplit(":", 1)[1])
            ok, last = self._spawn_and_wait()
            if ok:
                return self
            if "in use" not in last:
                break
        pytest.fail(f"tern did not start:\n{last}")

    def _spawn_and_wait(self):
        err = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [tern_bin(), "serve", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=self.dir,
        )
        err.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False, f"exited early\n{self.config_path.read_text()}\n{self.stderr()}"
            try:
                self.health()
                return True, ""
            except Exception:
                time.sleep(0.05)
        self.kill()
        return False, f"not healthy after {READY_TIMEOUT}s\n{self.stderr()}"

    def health(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=2) as r:
            assert r.status == 200
            return json.load(r)

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def spool_list(self):
        assert self.proc is None, "stop the server first"
        out = subprocess.run(
            [tern_bin(), "spool", "list", "--data-dir", str(self.data_dir)],
            capture_output=True, text=True,
        )
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture
def tern_server(tmp_path, request):
    servers = []

    def start(users=None, **config):
        d = tmp_path / f"tern{len(servers)}"
        d.mkdir()
        s = TernServer(d, config, users or {})
        servers.append(s)
        return s.start()

    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for s in servers:
        s.kill()
        if failed:
            print(f"--- tern stderr ({s.stderr_path}) ---\n{s.stderr()[-6000:]}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
