"""Model cards: what an encoder is, what it was trained on and how it is calibrated.

One card per encoder fingerprint, applied the same way for every backend (as
torchxrayvision attaches per-weights metadata to every model). A card comes from, in
order:

1. ``MEDLENS_HOME/cards/<fingerprint>.json`` — written by ``medlens calibrate --write``
   for any backend (open_clip, hf, or a lite model calibrated locally);
2. the metadata shipped with the weights (``encoder.meta``: the lite heads file carries
   its training recipe and calibration);
3. otherwise an uncalibrated card (temperature 1, no offsets, the triage policy's
   thresholds).

Keyed by fingerprint, a card can never be applied to weights it was not fitted on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import ModelUnavailable

CARD_FORMAT = "medlens-model-card/1"


@dataclass(frozen=True)
class Calibration:
    """Per-domain temperature, per-finding logit offsets and triage thresholds.

    Probabilities are softmax((z + b) / T) for a differential and sigmoid(z / T) for
    per-finding (multi-label) scores; see ``medlens.analysis.scoring``.
    """

    temperature: dict[str, float] = field(default_factory=dict)
    bias: dict[str, dict[str, float]] = field(default_factory=dict)
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # report, fitted_on, target ...

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Calibration:
        """Parse and check: temperatures must be finite and positive, offsets and
        thresholds finite (ValueError otherwise: a broken card never scores)."""
        raw = dict(raw or {})
        cal = cls(
            temperature={k: float(v) for k, v in (raw.pop("temperature", None) or {}).items()},
            bias={
                d: {f: float(b) for f, b in (v or {}).items()}
                for d, v in (raw.pop("bias", None) or {}).items()
            },
            thresholds={
                d: {f: float(t) for f, t in (v or {}).items()}
                for d, v in (raw.pop("thresholds", None) or {}).items()
            },
            extra=raw,
        )
        values = [*cal.temperature.values()]
        values += [v for d in (*cal.bias.values(), *cal.thresholds.values()) for v in d.values()]
        if not all(np.isfinite(v) for v in values) or any(t <= 0 for t in cal.temperature.values()):
            raise ValueError("non-finite or non-positive calibration values")
        return cal

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "bias": self.bias,
            "thresholds": self.thresholds,
            **self.extra,
        }

    def __bool__(self) -> bool:
        return bool(self.temperature or self.bias or self.thresholds)

    def temperature_for(self, domain: str) -> float:
        """The domain's fitted temperature, 1.0 when there is none."""
        return float(self.temperature.get(domain) or 1.0)

    def bias_for(self, domain: str, finding_ids: list[str]) -> np.ndarray:
        """Per-finding logit offsets in ``finding_ids`` order (zeros where none)."""
        stored = self.bias.get(domain) or {}
        return np.array([float(stored.get(f, 0.0)) for f in finding_ids], dtype=np.float64)

    def thresholds_for(self, domain: str) -> dict[str, float]:
        return dict(self.thresholds.get(domain) or {})

    @property
    def id(self) -> str | None:
        """Hash of the values in force: the fingerprint covers the weights only, so
        results record which calibration produced them."""
        if not self:
            return None
        used = {
            "temperature": self.temperature or None,
            "bias": self.bias or None,
            "thresholds": self.thresholds or None,
        }
        return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ModelCard:
    """Identity, provenance and calibration of one set of weights."""

    name: str
    fingerprint: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    trained_on: tuple[str, ...] = ()
    trained_at: str | None = None
    calibration: Calibration = field(default_factory=Calibration)
    source: str = "uncalibrated"  # "home" | "weights" | "uncalibrated"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "preprocessing": self.preprocessing,
            "trained_on": list(self.trained_on),
            "trained_at": self.trained_at,
            "calibration": self.calibration.to_dict(),
        }


def card_path(cards_dir: Path, fingerprint: str) -> Path:
    return Path(cards_dir) / f"{fingerprint}.json"


def _preprocessing(encoder: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in ("image_size", "preprocess_version", "backbone"):
        value = getattr(encoder, attr, None)
        if value is not None:
            out[attr] = value
    return out


def card_for(encoder: Any, cards_dir: Path | None = None) -> ModelCard:
    """The card in force for ``encoder`` (see the module docstring for the order)."""
    meta = dict(getattr(encoder, "meta", None) or {})
    recipe = meta.get("recipe") or {}
    base = {
        "name": str(getattr(encoder, "name", "?")),
        "fingerprint": encoder.fingerprint,
        "preprocessing": _preprocessing(encoder),
        "trained_on": tuple(recipe.get("data") or ()),
        "trained_at": meta.get("trained_at"),
    }
    if cards_dir is not None:
        path = card_path(cards_dir, encoder.fingerprint)
        if path.is_file():
            try:
                raw = json.loads(path.read_text("utf-8"))
                found = raw.get("fingerprint") == encoder.fingerprint
                cal = Calibration.from_dict(raw.get("calibration")) if found else None
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                raise ModelUnavailable(
                    f"the model card {path} is unreadable or corrupt ({exc}); delete it or "
                    "re-run `medlens calibrate --write`"
                ) from None
            if cal is not None:
                return ModelCard(**base, calibration=cal, source="home")
    if meta.get("calibration"):
        try:
            cal = Calibration.from_dict(meta["calibration"])
        except (ValueError, TypeError, AttributeError) as exc:
            raise ModelUnavailable(
                f"the calibration shipped with model {base['name']} is corrupt ({exc}); "
                "reinstall the weights or re-run `medlens calibrate --write`"
            ) from None
        return ModelCard(**base, calibration=cal, source="weights")
    return ModelCard(**base)


def write_card(card: ModelCard, cards_dir: Path) -> Path:
    """Write ``card`` to ``cards_dir/<fingerprint>.json`` atomically."""
    path = card_path(cards_dir, card.fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".card-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(card.to_dict(), fh, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path
