"""Start, watch and stop the API and UI processes (``medlens demo``, tests, benchmarks).

Both run as child processes of the caller, so one Ctrl-C or SIGTERM stops everything
and a crashed child is noticed instead of leaving a half-working demo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from medlens.errors import ConfigError

UI_APP = Path(__file__).resolve().parents[1] / "ui" / "app.py"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (SO_REUSEADDR, as uvicorn and
    Streamlit bind, so a port in TIME_WAIT counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def api_command(host: str, port: int, model: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "medlens.cli", "serve", "--host", host, "--port", str(port)]
    cmd += ["--log-level", "info"]  # the demo's logs/api.log: start-up, one line per request
    return [*cmd, "--model", model] if model else cmd


def ui_command(host: str, port: int, max_upload_mb: int = 64) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(UI_APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--server.maxUploadSize", str(max_upload_mb),
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--theme.base", "light",
    ]  # fmt: skip


def start(
    cmd: list[str], env: dict[str, str] | None = None, log_file: Path | None = None
) -> subprocess.Popen:
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - child owns it
    return subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
    )


def wait_http_ok(
    url: str, proc: subprocess.Popen | None, timeout_s: float, name: str = "service"
) -> float:
    """Poll ``url`` until it answers 200; seconds waited. Fails fast if ``proc`` exits."""
    t0 = time.perf_counter()
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise ConfigError(f"{name} exited with code {proc.returncode} while starting")
            try:
                if client.get(url).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            if time.perf_counter() - t0 > timeout_s:
                raise ConfigError(f"{name} did not become ready at {url} within {timeout_s:.0f} s")
            time.sleep(0.1)


def stop(*procs: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM each child, then SIGKILL whatever is still alive after ``timeout_s``."""
    alive = [p for p in procs if p is not None and p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in alive:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
