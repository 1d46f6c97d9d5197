"""The service commands: ``serve``, ``ui``, ``demo``, ``keys create|revoke|list`` and
``audit list|show|export|verify``. FastAPI, uvicorn, Streamlit and the model are
imported inside the commands (or run in child processes), never at import."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from functools import wraps
from pathlib import Path
from typing import Any

import typer

from medlens.cli.common import err, friendly, private_log
from medlens.config import Settings
from medlens.errors import ConfigError


def _console() -> Any:
    from rich.console import Console

    return Console()


# -- serve / ui ------------------------------------------------------------------------
def serve(
    host: str | None = typer.Option(
        None,
        help="Listen address (default MEDLENS_API_HOST or 127.0.0.1). Anything beyond "
        "loopback requires API keys.",
    ),
    port: int | None = typer.Option(None, help="Port (default MEDLENS_API_PORT or 8000)."),
    model: str | None = typer.Option(None, help="Encoder name (default: lite or MEDLENS_MODEL)."),
    workers: int | None = typer.Option(None, min=1, help="Model worker threads."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    *,
    settings: Settings,
) -> None:
    """Run the HTTP API (OpenAPI docs at /docs)."""
    from medlens.api.server import serve as run_server

    run_server(host, port, model=model, workers=workers, settings=settings, log_level=log_level)


def ui(
    api_url: str | None = typer.Option(None, help="API base URL (default MEDLENS_API_URL)."),
    host: str = typer.Option("127.0.0.1", help="UI listen address."),
    port: int | None = typer.Option(None, help="UI port (default MEDLENS_UI_PORT or 8501)."),
    *,
    settings: Settings,
) -> None:
    """Run the Streamlit clinician UI against a running API."""
    import subprocess

    cmd, env = _ui_process(api_url, host, port, settings)
    # Its own process group, stopped as a whole however this process is asked to stop
    # (Ctrl-C, SIGTERM, SIGHUP): a Streamlit left running would keep the API key.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def _stop(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        _stop_group(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    raise typer.Exit(code)


def _stop_group(proc: Any, timeout_s: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it if it has not exited in time."""
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _ui_process(
    api_url: str | None, host: str, port: int | None, settings: Settings
) -> tuple[list[str], dict[str, str]]:
    """The Streamlit command line and environment of ``medlens ui``; refuses a non-loopback
    address unless an authenticating reverse proxy is declared, and a port in use."""
    from medlens.api.launch import ui_command
    from medlens.api.server import check_port, is_loopback

    if not is_loopback(host) and not settings.ui_behind_proxy:
        raise ConfigError(
            f"the UI has no login of its own and holds the API key, so it listens on "
            f"loopback only; {host} would expose it. Put it behind an authenticating reverse "
            "proxy on this machine (keep --host 127.0.0.1), or, if the proxy must reach it "
            "over the network, set MEDLENS_UI_BEHIND_PROXY=1 (docs/service.md)"
        )
    port = port or settings.ui_port
    check_port(host, port, "MEDLENS_UI_PORT")
    cmd = ui_command(host, port, settings.api_max_upload_bytes // 2**20)
    return cmd, {**os.environ, "MEDLENS_API_URL": api_url or settings.api_url}


def ui_exec_main() -> None:
    """``python -m medlens.ui``: ``medlens ui`` (same options) for containers, with
    Streamlit replacing this process so that signals reach it directly."""

    @wraps(ui)
    def exec_ui(api_url: str | None, host: str, port: int | None, settings: Settings) -> None:
        cmd, env = _ui_process(api_url, host, port, settings)
        sys.stdout.flush()
        os.execve(cmd[0], cmd, env)

    typer.run(friendly(exec_ui))


# -- keys --------------------------------------------------------------------------------
def keys_create(
    name: str = typer.Argument(..., help="Who or what uses the key."),
    *,
    settings: Settings,
) -> None:
    """Create a key and print it once."""
    from medlens.api.keys import KeyStore

    store = KeyStore(settings.api_keys_file)
    plain, entry = store.create(name)
    err.print(
        f"created key [bold]{entry.id}[/bold] ({entry.name}); store it now, it is not shown "
        f"again. Send it as 'Authorization: Bearer <key>'. Hashes live in {store.path}"
    )
    sys.stdout.write(plain + "\n")


def keys_revoke(
    key_id: str = typer.Argument(..., help="Key id (see `medlens keys list`)."),
    *,
    settings: Settings,
) -> None:
    """Revoke a key (takes effect at once, no restart)."""
    from medlens.api.keys import KeyStore

    entry = KeyStore(settings.api_keys_file).revoke(key_id)
    _console().print(f"revoked {entry.id} ({entry.name}) at {entry.revoked}")


def keys_list(as_json: bool = typer.Option(False, "--json"), *, settings: Settings) -> None:
    """List keys (ids, names, dates; never the keys)."""
    from rich.table import Table

    from medlens.api.keys import KeyStore

    keys = KeyStore(settings.api_keys_file).list()
    if as_json:
        sys.stdout.write(json.dumps([k.public() for k in keys]) + "\n")
        return
    table = Table(title="API keys")
    for col in ("id", "name", "created", "status"):
        table.add_column(col)
    for k in keys:
        table.add_row(k.id, k.name, k.created, "active" if k.active else f"revoked {k.revoked}")
    _console().print(table)


# -- audit -------------------------------------------------------------------------------
def _audit(settings: Settings) -> Any:
    from medlens.audit import AuditLog

    return AuditLog.from_settings(settings)


def audit_list(
    limit: int = typer.Option(20, min=1, help="Newest N records."),
    as_json: bool = typer.Option(False, "--json"),
    *,
    settings: Settings,
) -> None:
    """List the newest analyses."""
    from rich.table import Table

    records = _audit(settings).list(limit)
    if as_json:
        rows = [{k: v for k, v in r.to_dict().items() if k != "output"} for r in records]
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title=f"Audit trail (newest {limit})")
    for col in ("#", "id", "time (UTC)", "key", "model", "domain", "top finding", "triage"):
        table.add_column(col)
    for r in records:
        table.add_row(
            str(r.seq), r.id, r.created_at, r.api_key_id,
            f"{r.model_name}@{r.model_fingerprint[:8]}", r.domain, r.top_finding, r.triage_level,
        )  # fmt: skip
    _console().print(table)


def audit_show(
    record_id: str = typer.Argument(..., help="Request id or sequence number."),
    *,
    settings: Settings,
) -> None:
    """Print one record (with the full analysis output) as JSON."""
    record = _audit(settings).get(record_id)
    if record is None:
        raise ConfigError(f"no audit record {record_id!r} (see `medlens audit list`)")
    sys.stdout.write(json.dumps(record.to_dict(), indent=2, ensure_ascii=False) + "\n")


def audit_export(
    out: Path | None = typer.Option(None, help="JSONL file (default: stdout)."),
    include_inputs: bool = typer.Option(
        False, help="Include stored input bytes (base64), when the site stores them."
    ),
    *,
    settings: Settings,
) -> None:
    """Export every record as JSON lines (hash-chain fields included)."""
    log = _audit(settings)
    if out is None:
        log.export_jsonl(sys.stdout, include_inputs=include_inputs)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        n = log.export_jsonl(fh, include_inputs=include_inputs)
    err.print(f"exported {n} records to {out}")


def audit_verify(
    export_head: Path | None = typer.Option(
        None,
        "--export-head",
        help="After a successful check, append the signed head (count, last hash, HMAC) as "
        "one JSON line to this file: the external anchor (docs/service.md).",
    ),
    *,
    settings: Settings,
) -> None:
    """Check the HMAC chain and its signed heads: exit 1 (one line naming the problem) if any
    record was altered, removed or the database wiped or replaced."""
    log = _audit(settings)
    result = log.verify()
    if not result.ok:
        err.print(
            f"audit trail broken: {result.reason} ({result.checked} checked)",
            soft_wrap=True,
            markup=False,
        )
        raise typer.Exit(1)
    _console().print(f"audit trail intact: {result.checked} records")
    if export_head is not None:
        export_head.parent.mkdir(parents=True, exist_ok=True)
        with open(export_head, "a") as fh:
            fh.write(json.dumps(log.head(), sort_keys=True) + "\n")
        err.print(f"signed head appended to {export_head}")


# -- demo --------------------------------------------------------------------------------
def run_demo(
    model: str | None = None,
    api_port: int | None = None,
    ui_port: int | None = None,
    host: str = "127.0.0.1",
    ready_timeout_s: float = 600.0,
    settings: Settings | None = None,
) -> None:
    """Start API + UI on localhost, print the URLs, stop both on Ctrl-C / SIGTERM."""
    from medlens.api import launch
    from medlens.api.cases import build_demo_case_library
    from medlens.config import get_settings

    s = settings or get_settings()
    con = _console()
    if s.data is not None:
        build_demo_case_library(s)
    ports = []
    for wanted, default in ((api_port, s.api_port), (ui_port, s.ui_port)):
        port = wanted or default
        if not launch.port_is_free(host, port):
            if wanted:
                raise ConfigError(f"port {port} on {host} is in use; choose another")
            port = launch.free_port(host)
        ports.append(port)
    api_url = f"http://{host}:{ports[0]}"
    logs = s.logs_dir
    for name in ("api.log", "ui.log"):
        private_log(logs / name)

    def _term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _term)
    api = ui = None
    try:
        api = launch.start(launch.api_command(host, ports[0], model), log_file=logs / "api.log")
        ui = launch.start(
            launch.ui_command(host, ports[1], s.api_max_upload_bytes // 2**20),
            env={"MEDLENS_API_URL": api_url},
            log_file=logs / "ui.log",
        )
        with con.status("starting the API (loading the model) and the UI…"):
            t_api = launch.wait_http_ok(f"{api_url}/readyz", api, ready_timeout_s, "the API")
            launch.wait_http_ok(
                f"http://{host}:{ports[1]}/_stcore/health", ui, ready_timeout_s, "the UI"
            )
        con.print(f"[bold green]MedLens is running[/bold green] (model ready in {t_api:.1f} s)")
        con.print(f"  UI:       http://{host}:{ports[1]}")
        con.print(f"  API:      {api_url}   docs: {api_url}/docs")
        con.print(f"  logs:     {logs}/api.log, {logs}/ui.log")
        con.print("[dim]Decision support only; not a diagnosis. Press Ctrl-C to stop.[/dim]")
        while True:
            for name, proc in (("the API", api), ("the UI", ui)):
                if proc.poll() is not None:
                    raise ConfigError(
                        f"{name} stopped unexpectedly (exit {proc.returncode}); see {logs}"
                    )
            time.sleep(0.5)
    except KeyboardInterrupt:
        con.print("stopping…")
    finally:
        launch.stop(ui, api)
        signal.signal(signal.SIGTERM, previous)


def demo(
    model: str | None = typer.Option(None, help="Encoder name (default: lite)."),
    api_port: int | None = typer.Option(None, help="API port (default 8000, or a free one)."),
    ui_port: int | None = typer.Option(None, help="UI port (default 8501, or a free one)."),
    *,
    settings: Settings,
) -> None:
    """Start the API and the clinician UI on localhost; Ctrl-C stops both."""
    run_demo(model=model, api_port=api_port, ui_port=ui_port, settings=settings)


def register(app: typer.Typer) -> None:
    """Add serve, ui, demo and the keys and audit groups to the ``medlens`` app."""
    app.command("serve")(friendly(serve))
    app.command("ui")(friendly(ui))
    app.command("demo")(friendly(demo))
    keys_app = typer.Typer(help="API keys (only their hashes are stored).", no_args_is_help=True)
    keys_app.command("create")(friendly(keys_create))
    keys_app.command("revoke")(friendly(keys_revoke))
    keys_app.command("list")(friendly(keys_list))
    app.add_typer(keys_app, name="keys")
    audit_app = typer.Typer(help="The audit trail of analyses (append-only).", no_args_is_help=True)
    audit_app.command("list")(friendly(audit_list))
    audit_app.command("show")(friendly(audit_show))
    audit_app.command("export")(friendly(audit_export))
    audit_app.command("verify")(friendly(audit_verify))
    app.add_typer(audit_app, name="audit")
