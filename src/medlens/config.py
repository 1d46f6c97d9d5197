"""Settings from the environment (MEDLENS_*), with one place for every default.

All state MedLens writes (model cache, libraries, logs, audit DB) lives under
``MEDLENS_HOME`` (default ``~/.medlens``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
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


def cores() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    # Supervised classifiers (e.g. ``txv:/path/densenet121.pt``), comma-separated: their
    # probabilities replace the zero-shot ones for the findings they cover in their domain.
    classifiers: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            c.strip() for c in os.environ.get("MEDLENS_CLASSIFIERS", "").split(",") if c.strip()
        )
    )
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
    # Two workers, the cores split between them (`api_torch_threads`, 0 = cores ÷
    # workers): on 2 cores with 8 clients, 2 workers × 1 torch thread served 15.5-16.2
    # req/s where 1 × 2 served 14.4 (benchmarks/api_load.py; one small forward does not
    # keep two threads busy, and a second job decodes and audits while the first runs).
    api_workers: int = field(
        default_factory=lambda: _env_int("MEDLENS_API_WORKERS", min(2, cores()))
    )
    api_torch_threads: int = field(default_factory=lambda: _env_int("MEDLENS_API_TORCH_THREADS", 0))
    # glibc malloc keeps freed batch memory for reuse (models._util.ALLOCATOR_SETTINGS).
    malloc_tuning: bool = field(default_factory=lambda: _env_bool("MEDLENS_MALLOC_TUNING", True))
    # Single-image analysis runs the lite image tower in ONNX Runtime (models.onnx_lite).
    onnx_engine: bool = field(default_factory=lambda: _env_bool("MEDLENS_ONNX", True))
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
    # Reports (docs/reports.md): an OpenAI-compatible endpoint that rewrites the narrative
    # for readability; a rewrite is kept only when grounded, else the template (with a note).
    llm_url: str | None = field(default_factory=lambda: os.environ.get("MEDLENS_LLM_URL") or None)
    llm_model: str = field(default_factory=lambda: os.environ.get("MEDLENS_LLM_MODEL", "default"))
    llm_timeout_s: float = field(default_factory=lambda: _env_int("MEDLENS_LLM_TIMEOUT_S", 10))
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
    # Case library ids: opaque (content-hash based) unless the library owner opts in to
    # the datasets' own record ids / file names, which can name a patient.
    library_named_ids: bool = field(
        default_factory=lambda: _env_bool("MEDLENS_LIBRARY_NAMED_IDS", False)
    )
    # Per-installation secret keying pseudonyms (symptom hashes, patient-group hashes);
    # unset: a 0600 file under home, made on first use (``install_secret``).
    install_secret_env: str | None = field(
        default_factory=lambda: os.environ.get("MEDLENS_INSTALL_SECRET") or None, repr=False
    )

    @property
    def service_torch_threads(self) -> int:
        """Torch threads per forward in the service: the cores split among the workers."""
        if self.api_torch_threads < 0:
            from medlens.errors import ConfigError

            raise ConfigError("MEDLENS_API_TORCH_THREADS must be >= 0 (0: cores ÷ workers)")
        return self.api_torch_threads or max(1, cores() // max(1, self.api_workers))

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

    @property
    def install_secret_file(self) -> Path:
        """Where ``install_secret`` keeps the key when MEDLENS_INSTALL_SECRET is unset."""
        return self.home / "secret.key"

    def install_secret(self) -> bytes:
        """The per-installation secret that keys pseudonyms (HMAC): without it a hash of a
        short text or a patient id is reversed by guessing. MEDLENS_INSTALL_SECRET wins;
        else a random 32-byte key in a 0600 file under home, created on first use (two
        racing first uses agree: the loser reads the winner's file)."""
        if self.install_secret_env:
            if len(self.install_secret_env) < 16:
                from medlens.errors import ConfigError

                raise ConfigError(
                    "MEDLENS_INSTALL_SECRET is shorter than 16 characters: use a long random "
                    "value (e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
                )
            return self.install_secret_env.encode()
        path = self.install_secret_file
        if not path.is_file():
            import secrets

            ensure_home(self)
            write_private(path, secrets.token_hex(32).encode(), exclusive=True)
        key = path.read_bytes().strip()
        if len(key) < 32:
            from medlens.errors import ConfigError

            raise ConfigError(
                f"the installation secret {path.name} under MEDLENS_HOME is shorter than "
                "32 bytes (damaged?): restore it from backup, or delete it to make a new one "
                "(symptom hashes and pseudonyms made with the old one will no longer match)"
            )
        return key

    def require_data(self) -> Path:
        from medlens.errors import ConfigError

        if self.data is None or not self.data.is_dir():
            raise ConfigError(
                "MEDLENS_DATA is not set to a folder; point it at the sample datasets "
                "(e.g. export MEDLENS_DATA=../shared/data)"
            )
        return self.data


def ensure_home(settings: Settings | None = None) -> Path:
    """Create MEDLENS_HOME owner-only (0700): it holds the audit trail, key hashes,
    secrets and cached embeddings. An existing home is tightened to 0700 when MedLens
    owns it (a shared folder someone pointed it at is left as it is)."""
    home = (settings or get_settings()).home
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if home.stat().st_uid == os.getuid() and home.stat().st_mode & 0o077:
            home.chmod(0o700)
    except OSError:  # not ours to change: mode stays, files inside are still 0600
        pass
    return home


def private_dir(path: Path) -> Path:
    """``path`` (and missing parents) created 0700; returns it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def private_file(path: Path) -> Path:
    """Make an existing file owner-read/write only (0600); a missing one is created empty
    with that mode, so nothing is ever readable by others in between."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
    except OSError as exc:
        from medlens.errors import ConfigError

        raise ConfigError(f"cannot make {path.name} private (0600): {exc.strerror}") from exc
    return path


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> Path:
    """Write ``data`` to ``path`` created 0600 from the start (never world-readable, even
    for an instant). ``exclusive``: leave an existing file alone (first writer wins)."""
    import tempfile

    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if exclusive:
            # Atomic, complete or absent (a reader never sees half); the first writer wins.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def get_settings() -> Settings:
    """The settings for the current environment. Tests change it between calls, so they
    are rebuilt whenever a MEDLENS_* variable (or HOME) changed; ``load_image`` asks on
    every decode, and parsing some forty variables each time showed in its profile."""
    key = tuple(
        sorted((k, v) for k, v in os.environ.items() if k.startswith("MEDLENS_") or k == "HOME")
    )
    return _settings_for(key)


@lru_cache(maxsize=16)
def _settings_for(env: tuple[tuple[str, str], ...]) -> Settings:
    """One immutable Settings per environment snapshot (``env`` is the cache key only)."""
    return Settings()
