"""API keys: only their SHA-256 is stored (MEDLENS_HOME/api_keys.json, mode 0600).

A key looks like ``mlk_<id>_<secret>``: the id finds the entry without scanning, the
32-byte random secret makes a plain SHA-256 safe to store (no password stretching
is needed for high-entropy secrets). The server re-reads the file when it changes,
so ``medlens keys revoke`` takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from medlens.errors import ConfigError

PREFIX = "mlk"


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    sha256: str
    created: str
    revoked: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def public(self) -> dict[str, str | None]:
        """What `keys list` shows: never the hash."""
        return {"id": self.id, "name": self.name, "created": self.created, "revoked": self.revoked}


class KeyRejected(Exception):
    """A presented key is missing (401), unknown (401) or revoked (403)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class KeyStore:
    """Hashed API keys in one JSON file; safe to share between threads."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._keys: dict[str, ApiKey] = {}
        self._mtime: float | None = None

    # -- file --------------------------------------------------------------------------
    def _load(self) -> dict[str, ApiKey]:
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime_ns
            except FileNotFoundError:
                self._keys, self._mtime = {}, None
                return self._keys
            if mtime != self._mtime:
                try:
                    raw = json.loads(self.path.read_text())
                    self._keys = {k["id"]: ApiKey(**k) for k in raw.get("keys", [])}
                except (ValueError, TypeError, KeyError) as exc:
                    raise ConfigError(f"API key file {self.path} is not valid: {exc}") from exc
                self._mtime = mtime
            return self._keys

    def _save(self, keys: dict[str, ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"keys": [asdict(k) for k in keys.values()]}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".api_keys.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(payload)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            self._mtime = None  # force a re-read

    # -- management (CLI) --------------------------------------------------------------
    def create(self, name: str) -> tuple[str, ApiKey]:
        """A new key; the plain key is returned once and never stored."""
        name = name.strip()
        if not name:
            raise ConfigError("give the key a name (who or what uses it)")
        keys = dict(self._load())
        kid = secrets.token_hex(4)
        while kid in keys:  # pragma: no cover - 32-bit collision
            kid = secrets.token_hex(4)
        plain = f"{PREFIX}_{kid}_{secrets.token_urlsafe(32)}"
        entry = ApiKey(id=kid, name=name, sha256=_hash(plain), created=_now())
        keys[kid] = entry
        self._save(keys)
        return plain, entry

    def revoke(self, key_id: str) -> ApiKey:
        keys = dict(self._load())
        if key_id not in keys:
            raise ConfigError(f"no API key with id {key_id!r} (see `medlens keys list`)")
        entry = keys[key_id]
        if entry.revoked is None:
            entry = ApiKey(**{**asdict(entry), "revoked": _now()})
            keys[key_id] = entry
            self._save(keys)
        return entry

    def list(self) -> list[ApiKey]:
        return list(self._load().values())

    def has_active(self) -> bool:
        return any(k.active for k in self._load().values())

    # -- checking (server) -------------------------------------------------------------
    def check(self, presented: str | None) -> ApiKey:
        """The key's entry, or KeyRejected with the status the API should answer."""
        if not presented:
            raise KeyRejected(401, "an API key is required: send 'Authorization: Bearer <key>'")
        parts = presented.strip().split("_", 2)
        entry = self._load().get(parts[1]) if len(parts) == 3 and parts[0] == PREFIX else None
        if entry is None or not hmac.compare_digest(entry.sha256, _hash(presented.strip())):
            raise KeyRejected(401, "the API key is not valid")
        if not entry.active:
            raise KeyRejected(403, f"the API key {entry.id} was revoked on {entry.revoked}")
        return entry
