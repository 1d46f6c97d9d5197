"""Run the service with uvicorn, refusing to listen beyond loopback without API keys."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from medlens.api.keys import KeyStore
from medlens.config import Settings, get_settings
from medlens.errors import ConfigError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def needs_key(host: str, settings: Settings) -> bool:
    """Keys are required whenever the server listens beyond this machine; then at least
    one active key must exist, or nobody could use the service."""
    if is_loopback(host):
        return settings.api_require_key
    if not KeyStore(settings.api_keys_file).has_active():
        raise ConfigError(
            f"listening on {host} exposes the API beyond this machine, which requires API "
            "keys: create one with `medlens keys create NAME` (or listen on 127.0.0.1)"
        )
    return True


def check_port(host: str, port: int, setting: str) -> None:
    """Refuse a port in use before starting anything: uvicorn would exit while the model
    loads in another thread, and the interpreter would abort (SIGABRT) on the way out."""
    from medlens.api.launch import port_is_free

    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is not a valid TCP port (1-65535; {setting} or --port)")
    if not port_is_free(host, port):
        raise ConfigError(
            f"port {port} on {host} is already in use: stop what listens there or choose "
            f"another with --port (or {setting})"
        )


def log_to_stderr(level: str) -> None:
    """Also write MedLens's own log lines (one per request, model load, timeouts) to
    stderr, where ``medlens demo`` collects them into logs/api.log."""
    import logging
    import sys

    root = logging.getLogger("medlens")
    if any(getattr(h, "medlens_stderr", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.medlens_stderr = True  # type: ignore[attr-defined]
    handler.setLevel(getattr(logging, level.upper(), logging.INFO))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > handler.level:
        root.setLevel(handler.level)


def serve(
    host: str | None = None,
    port: int | None = None,
    *,
    model: str | None = None,
    workers: int | None = None,
    settings: Settings | None = None,
    log_level: str = "info",
) -> None:
    """Blocking: serve until SIGINT/SIGTERM (uvicorn shuts down gracefully)."""
    s = settings or get_settings()
    if workers is not None:
        s = replace(s, api_workers=workers)
    host = host or s.api_host
    port = port if port is not None else s.api_port
    require = needs_key(host, s)
    check_port(host, port, "MEDLENS_API_PORT")
    # Links in answers default to the address actually served (MEDLENS_PUBLIC_URL wins).
    s = replace(s, api_host=host, api_port=port)
    log_to_stderr(log_level)
    import uvicorn

    from medlens.api.app import create_app
    from medlens.pipeline import MedLens

    app = create_app(
        s,
        lens=MedLens(model=model, settings=s),
        require_key=require,
        torch_threads=s.service_torch_threads,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
