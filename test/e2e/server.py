"""Start the real server on loopback, talk HTTP to it, stop it and check nothing is left behind."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from lightvlm.common.ports import free_ports

SHM = Path("/dev/shm")


def children_of(pid: int) -> list[int]:
    """All descendants of `pid`, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found += kids
        frontier += kids
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Server:
    def __init__(self, model_dir, *args, env: dict | None = None, log_path: Path | None = None):
        self.port = free_ports(1)[0]
        self.api_key = next((args[i + 1] for i, a in enumerate(args) if a == "--api_key"), None)
        self.url = f"http://127.0.0.1:{self.port}"
        model = ["--model_dir", str(model_dir)] if model_dir is not None else []  # None: the demo checkpoint
        # fp32 unless a test asks otherwise: the tests compare with fp32 references token by token
        dtype = [] if "--data_type" in args else ["--data_type", "fp32"]
        command = [sys.executable, "-m", "lightvlm.server.api_server", *model, "--port", str(self.port), *dtype,
                   *map(str, args)]
        self.log_path = log_path
        self.log = open(log_path, "w+") if log_path else subprocess.DEVNULL  # noqa: SIM115 (lives with the server)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
        self.instance = None
        self.descendants: list[int] = []

    def wait_ready(self, timeout: float = 240) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.descendants = children_of(self.process.pid)
                    match = re.search(r"instance (\w+),", self.output())
                    self.instance = match.group(1) if match else None
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        if not self.log_path:
            return ""
        return self.log_path.read_text(errors="replace")

    def shm_segments(self) -> list[str]:
        return sorted(p.name for p in SHM.glob(f"lvlm{self.instance}_*")) if self.instance else []

    @property
    def model_name(self) -> str:
        """The served name, which OpenAI requests must give (another is a 404)."""
        return self.get("/get_model_name").json()["model_name"]

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, json=None, **kwargs) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return requests.post(self.url + path, json=json, headers=headers, timeout=kwargs.pop("timeout", 120),
                             **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return requests.get(self.url + path, headers=headers, timeout=kwargs.pop("timeout", 30), **kwargs)

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> float:
        """Signal the launcher; returns seconds until it and every descendant were gone."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        while any(alive(p) for p in self.descendants) and time.monotonic() - started < timeout:
            time.sleep(0.05)
        return time.monotonic() - started


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):
    """Poll until `predicate()` is truthy or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
