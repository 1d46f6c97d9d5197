"""Settings from the environment (MEDLENS_*), with one place for every default.

All state MedLens writes (model cache, libraries, logs, audit DB) lives under
``MEDLENS_HOME`` (default ``~/.medlens``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        from medlens.errors import ConfigError

        raise ConfigError(f"{name}={raw!r} is not an integer") from exc


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    from medlens.errors import ConfigError

    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


@dataclass(frozen=True)
class Settings:
    home: Path = field(
        default_factory=lambda: Path(os.environ.get("MEDLENS_HOME", "~/.medlens")).expanduser()
    )
    data: Path | None = field(
        default_factory=lambda: (
            Path(os.environ["MEDLENS_DATA"]).expanduser()
            if os.environ.get("MEDLENS_DATA")
            else None
        )
    )
    model: str = field(default_factory=lambda: os.environ.get("MEDLENS_MODEL", "lite"))
    device: str = field(default_factory=lambda: os.environ.get("MEDLENS_DEVICE", "cpu"))
    # Input limits: a file over max_bytes or an image over max_pixels is refused before decoding.
    max_bytes: int = field(default_factory=lambda: _env_int("MEDLENS_MAX_BYTES", 256 * 1024 * 1024))
    max_pixels: int = field(default_factory=lambda: _env_int("MEDLENS_MAX_PIXELS", 100_000_000))
    # Memory budget per image: the estimated peak of decoding one image (every intermediate
    # array); an image that would need more is refused before its pixels are decoded.
    max_decode_bytes: int = field(
        default_factory=lambda: _env_int("MEDLENS_MAX_DECODE_BYTES", 512 * 1024 * 1024)
    )
    max_text_chars: int = field(default_factory=lambda: _env_int("MEDLENS_MAX_TEXT_CHARS", 4000))
    # Retrieval (docs/retrieval.md): a Qdrant server/cluster URL switches the vector store
    # from embedded shards under MEDLENS_HOME/qdrant to that server.
    qdrant_url: str | None = field(
        default_factory=lambda: os.environ.get("MEDLENS_QDRANT_URL") or None
    )
    qdrant_api_key: str | None = field(
        default_factory=lambda: os.environ.get("MEDLENS_QDRANT_API_KEY") or None, repr=False
    )
    qdrant_shards: int = field(default_factory=lambda: _env_int("MEDLENS_QDRANT_SHARDS", 2))
    qdrant_replicas: int = field(default_factory=lambda: _env_int("MEDLENS_QDRANT_REPLICAS", 1))
    library: str = field(default_factory=lambda: os.environ.get("MEDLENS_LIBRARY", "default"))
    # Extra knowledge-pack folders (``*.yaml``, one domain each), os.pathsep-separated.
    knowledge_dirs: tuple[Path, ...] = field(
        default_factory=lambda: tuple(
            Path(p).expanduser()
            for p in os.environ.get("MEDLENS_KNOWLEDGE_PATH", "").split(os.pathsep)
            if p.strip()
        )
    )
    # Service (medlens serve / ui / demo). Auth is required whenever api_host is not loopback.
    api_host: str = field(default_factory=lambda: os.environ.get("MEDLENS_API_HOST", "127.0.0.1"))
    api_port: int = field(default_factory=lambda: _env_int("MEDLENS_API_PORT", 8000))
    api_url: str = field(
        default_factory=lambda: os.environ.get("MEDLENS_API_URL", "http://127.0.0.1:8000")
    )
    api_key: str | None = field(default_factory=lambda: os.environ.get("MEDLENS_API_KEY") or None)
    api_require_key: bool = field(
        default_factory=lambda: _env_bool("MEDLENS_API_REQUIRE_KEY", False)
    )
    # Model work runs in a bounded pool: `api_workers` threads + `api_queue` waiting jobs;
    # beyond that the API answers 503 + Retry-After instead of queueing without bound.
    api_workers: int = field(default_factory=lambda: _env_int("MEDLENS_API_WORKERS", 1))
    api_queue: int = field(default_factory=lambda: _env_int("MEDLENS_API_QUEUE", 16))
    api_timeout_s: int = field(default_factory=lambda: _env_int("MEDLENS_API_TIMEOUT_S", 60))
    api_max_upload_bytes: int = field(
        default_factory=lambda: _env_int("MEDLENS_API_MAX_UPLOAD_BYTES", 64 * 1024 * 1024)
    )
    cors_origins: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            o.strip() for o in os.environ.get("MEDLENS_CORS_ORIGINS", "").split(",") if o.strip()
        )
    )
    ui_port: int = field(default_factory=lambda: _env_int("MEDLENS_UI_PORT", 8501))
    # The UI has no login of its own: it binds to loopback unless it sits behind an
    # authenticating reverse proxy (docs/service.md) and this says so.
    ui_behind_proxy: bool = field(
        default_factory=lambda: _env_bool("MEDLENS_UI_BEHIND_PROXY", False)
    )
    # Base URL clients reach the API at; links in responses (thumbnail_url) are built
    # from it, never from the request's Host header. Default: http://<api_host>:<api_port>.
    public_url: str | None = field(
        default_factory=lambda: (os.environ.get("MEDLENS_PUBLIC_URL") or "").rstrip("/") or None
    )
    # Audit trail: SQLite under home by default; any SQLAlchemy URL (postgresql+psycopg://...).
    db_url: str | None = field(default_factory=lambda: os.environ.get("MEDLENS_DB_URL") or None)
    # HMAC key of the audit chain; unset: a 0600 key file under home, made on first use.
    audit_key: str | None = field(
        default_factory=lambda: os.environ.get("MEDLENS_AUDIT_KEY") or None, repr=False
    )
    audit_store_inputs: bool = field(
        default_factory=lambda: _env_bool("MEDLENS_AUDIT_STORE_INPUTS", False)
    )
    audit_store_identifiers: bool = field(
        default_factory=lambda: _env_bool("MEDLENS_AUDIT_STORE_IDENTIFIERS", False)
    )

    @property
    def cache_dir(self) -> Path:
        """The embedding cache (``medlens.embeddings``): vectors keyed by content hash,
        never by file name or patient identifier; safe to delete."""
        return self.home / "cache"

    @property
    def cards_dir(self) -> Path:
        """Model cards (calibration) written by ``medlens calibrate``, one per fingerprint."""
        return self.home / "cards"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def api_keys_file(self) -> Path:
        """Hashed API keys (never the keys themselves); written by ``medlens keys``."""
        raw = os.environ.get("MEDLENS_API_KEYS_FILE")
        return Path(raw).expanduser() if raw else self.home / "api_keys.json"

    @property
    def audit_key_file(self) -> Path:
        """The audit chain's HMAC key when MEDLENS_AUDIT_KEY is unset (0600, never in the DB)."""
        return self.home / "audit.key"

    @property
    def audit_db_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'audit.db'}"

    def require_data(self) -> Path:
        from medlens.errors import ConfigError

        if self.data is None or not self.data.is_dir():
            raise ConfigError(
                "MEDLENS_DATA is not set to a folder; point it at the sample datasets "
                "(e.g. export MEDLENS_DATA=../shared/data)"
            )
        return self.data


def get_settings() -> Settings:
    """Read settings afresh (cheap); tests change the environment between calls."""
    return Settings()
