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


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: Path(os.environ.get("MEDLENS_HOME", "~/.medlens")).expanduser())
    data: Path | None = field(
        default_factory=lambda: Path(os.environ["MEDLENS_DATA"]).expanduser()
        if os.environ.get("MEDLENS_DATA")
        else None
    )
    model: str = field(default_factory=lambda: os.environ.get("MEDLENS_MODEL", "lite"))
    device: str = field(default_factory=lambda: os.environ.get("MEDLENS_DEVICE", "cpu"))
    # Input limits: a file over max_bytes or an image over max_pixels is refused before decoding.
    max_bytes: int = field(default_factory=lambda: _env_int("MEDLENS_MAX_BYTES", 256 * 1024 * 1024))
    max_pixels: int = field(default_factory=lambda: _env_int("MEDLENS_MAX_PIXELS", 100_000_000))
    max_text_chars: int = field(default_factory=lambda: _env_int("MEDLENS_MAX_TEXT_CHARS", 4000))

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

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
