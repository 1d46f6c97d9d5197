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
    import uvicorn

    from medlens.api.app import create_app
    from medlens.pipeline import MedLens

    s = settings or get_settings()
    if workers is not None:
        s = replace(s, api_workers=workers)
    host = host or s.api_host
    port = port if port is not None else s.api_port
    require = needs_key(host, s)
    app = create_app(s, lens=MedLens(model=model, settings=s), require_key=require)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
