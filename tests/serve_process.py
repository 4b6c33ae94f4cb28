"""A real `gemmatune serve` in a subprocess on a free loopback port, for the API and browser tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.cli_subprocess import ENV

API_KEY = "test-key-14"
# As tests/conftest.py does in-process: tiny random weights make denormals, ~80x slower on CPU unless flushed.
DRIVER = """
import sys, torch
torch.set_flush_denormal(True)
torch.set_num_threads(2)
from gemmatune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-c", DRIVER, "serve", "--port", str(self.port), "--api-key", API_KEY, *args]
        self.proc = subprocess.Popen(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gemmatune serve exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                request = urllib.request.Request(self.url + "/health", headers={"Authorization": f"Bearer {API_KEY}"})
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"gemmatune serve did not answer in 120 s:\n{log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve_args(base: Path, adapters: tuple[Path, Path], runs_dir: Path) -> list[str]:
    a, b = adapters
    return ["--base", str(base), "--adapter", f"a={a}", "--adapter", f"b={b}", "--precision", "fp32",
            "--runs", str(runs_dir), "--max-tokens-limit", "256", "--max-body-bytes", "65536"]
