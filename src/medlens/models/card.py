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
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import ModelUnavailable
from medlens.models.base import l2_normalize

CARD_FORMAT = "medlens-model-card/1"
OOD_FORMAT = "medlens-ood-reference/1"
# References shipped with MedLens for its packaged models (``<fingerprint>.ood.npz``).
PACKAGED_CARDS = Path(__file__).resolve().parent / "cards"


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
class SourceReference:
    """Where one source dataset's images fall for one encoder, in two spaces:

    - the joint **embedding**: a Gaussian (mean, Ledoit-Wolf precision), scored by the
      squared Mahalanobis distance (Lee et al., NeurIPS 2018, "A simple unified framework
      for detecting out-of-distribution samples and adversarial attacks");
    - the image tower's **features** (encoders that expose them, e.g. lite's ImageNet
      backbone, which still tells a cat from a skin lesion after the heads have pulled
      both towards the medical prompts): cosine distance to the ``K``-th nearest of a
      bank of training features (Sun et al., ICML 2022, "Out-of-distribution detection
      with deep nearest neighbors").

    Each distance is divided by its threshold (a quantile of the source's validation
    images), so a score of at most 1 in every space it has means "like this source".
    """

    name: str
    mean: np.ndarray  # (d,) embedding space
    precision: np.ndarray  # (d, d)
    emb_threshold: float
    bank: np.ndarray | None = None  # (m, f) L2-normalised features
    feat_threshold: float | None = None

    def emb_distance(self, emb: np.ndarray) -> np.ndarray:
        diff = np.atleast_2d(np.asarray(emb, np.float64)) - self.mean
        return np.einsum("nd,de,nd->n", diff, self.precision, diff)

    def feat_distance(self, feats: np.ndarray, k: int) -> np.ndarray:
        assert self.bank is not None
        q = l2_normalize(np.atleast_2d(feats))
        sims = q @ self.bank.T  # float32 in memory (float16 on disk)
        kth = np.partition(sims, -k, axis=1)[:, -k]
        return 1.0 - kth

    def scores(self, emb: np.ndarray, feats: np.ndarray | None, k: int) -> np.ndarray:
        """(N,) the larger of the normalised distances (≤ 1: like this source)."""
        out = self.emb_distance(emb) / self.emb_threshold
        if self.bank is not None and feats is not None and self.feat_threshold:
            out = np.maximum(out, self.feat_distance(feats, k) / self.feat_threshold)
        return out


@dataclass(frozen=True)
class DomainReference:
    """A domain's sources; an image is in distribution when some source admits it."""

    sources: tuple[SourceReference, ...]
    acceptance: float  # the quantile of each source's validation distances admitted

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    def scores(
        self, emb: np.ndarray, feats: np.ndarray | None, k: int
    ) -> tuple[np.ndarray, list[str]]:
        """(N,) the lowest source score per image, and which source gave it."""
        per = np.stack([s.scores(emb, feats, k) for s in self.sources])  # (S, N)
        best = per.argmin(axis=0)
        return per.min(axis=0), [self.sources[i].name for i in best]


@dataclass(frozen=True)
class OodReference:
    """Per-domain references of one encoder (by fingerprint), with how they were made."""

    fingerprint: str
    domains: dict[str, DomainReference]
    k: int = 10
    info: dict[str, Any] = field(default_factory=dict)  # fitted_at, command, splits ...

    @property
    def uses_features(self) -> bool:
        return any(s.bank is not None for d in self.domains.values() for s in d.sources)

    @property
    def id(self) -> str:
        h = hashlib.sha256(f"{self.fingerprint}|{self.k}".encode())
        for name in sorted(self.domains):
            for src in self.domains[name].sources:
                h.update(f"{name}|{src.name}|{src.emb_threshold}|{src.feat_threshold}".encode())
                h.update(np.ascontiguousarray(src.mean, np.float32).tobytes())  # as stored
        return h.hexdigest()[:12]


def _ood_arrays(ref: OodReference) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta: dict[str, Any] = {
        "format": OOD_FORMAT,
        "fingerprint": ref.fingerprint,
        "k": ref.k,
        "info": ref.info,
        "domains": {},
    }
    arrays: dict[str, np.ndarray] = {}
    for d, r in sorted(ref.domains.items()):
        meta["domains"][d] = {
            "acceptance": r.acceptance,
            "sources": [
                {
                    "name": s.name,
                    "emb_threshold": s.emb_threshold,
                    "feat_threshold": s.feat_threshold,
                }
                for s in r.sources
            ],
        }
        for s in r.sources:
            arrays[f"{d}/{s.name}/mean"] = np.ascontiguousarray(s.mean, np.float32)
            arrays[f"{d}/{s.name}/precision"] = np.ascontiguousarray(s.precision, np.float32)
            if s.bank is not None:
                arrays[f"{d}/{s.name}/bank"] = np.ascontiguousarray(s.bank, np.float16)
    return meta, arrays


def _ood_checksum(meta_json: bytes, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta_json)
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(f"{arrays[k].dtype}|{arrays[k].shape}".encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def ood_path(cards_dir: Path, fingerprint: str) -> Path:
    return Path(cards_dir) / f"{fingerprint}.ood.npz"


def write_ood(ref: OodReference, cards_dir: Path) -> Path:
    """Write ``ref`` to ``cards_dir/<fingerprint>.ood.npz`` atomically, with a checksum
    of its contents that ``read_ood`` verifies."""
    meta, arrays = _ood_arrays(ref)
    meta_json = json.dumps(meta, sort_keys=True).encode()
    path = ood_path(cards_dir, ref.fingerprint)
    return write_checked_npz(path, meta_json, _ood_checksum(meta_json, arrays), arrays)


# What reading a damaged .npz artifact (OOD reference, fusion head) can raise.
ARTIFACT_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    UnicodeDecodeError,
    zipfile.BadZipFile,
)


def write_checked_npz(
    path: Path, meta_json: bytes, checksum: str, arrays: dict[str, np.ndarray]
) -> Path:
    """Write a model artifact atomically: its JSON metadata, the checksum its reader
    verifies and its arrays, in one .npz (written to a temporary file, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz")
    with os.fdopen(fd, "wb") as fh:
        np.savez(
            fh,
            meta=np.frombuffer(meta_json, np.uint8),
            checksum=np.frombuffer(checksum.encode(), np.uint8),
            **arrays,
        )
    os.replace(tmp, path)
    return path


def read_ood(path: Path) -> OodReference:
    """Load and verify a reference; anything unreadable, altered or non-finite is
    ``ModelUnavailable`` (an analysis never runs on a broken gate)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta_json = z["meta"].tobytes()
            checksum = z["checksum"].tobytes().decode()
            arrays = {k: z[k] for k in z.files if k not in ("meta", "checksum")}
        meta = json.loads(meta_json)
        if meta.get("format") != OOD_FORMAT or checksum != _ood_checksum(meta_json, arrays):
            raise ValueError("checksum or format mismatch")
        domains = {}
        for d, m in meta["domains"].items():
            sources = []
            for src in m["sources"]:
                key = f"{d}/{src['name']}"
                feat_thr = src.get("feat_threshold")
                s = SourceReference(
                    name=src["name"],
                    mean=arrays[f"{key}/mean"].astype(np.float64),
                    precision=arrays[f"{key}/precision"].astype(np.float64),
                    emb_threshold=float(src["emb_threshold"]),
                    bank=(
                        arrays[f"{key}/bank"].astype(np.float32)
                        if f"{key}/bank" in arrays
                        else None
                    ),
                    feat_threshold=None if feat_thr is None else float(feat_thr),
                )
                values = [s.mean, s.precision, s.emb_threshold, feat_thr or 1.0]
                if s.bank is not None:
                    values.append(s.bank)
                if not all(np.isfinite(v).all() for v in values) or s.emb_threshold <= 0:
                    raise ValueError("non-finite or non-positive values")
                sources.append(s)
            domains[d] = DomainReference(tuple(sources), float(m["acceptance"]))
    except ARTIFACT_ERRORS as exc:
        raise ModelUnavailable(
            f"the out-of-distribution reference {path} is unreadable or corrupt ({exc}); "
            "delete it and re-run `medlens ood fit`"
        ) from None
    return OodReference(meta["fingerprint"], domains, int(meta.get("k", 10)), meta.get("info", {}))


def find_ood(fingerprint: str, cards_dir: Path | None) -> OodReference | None:
    """The reference for ``fingerprint``: MEDLENS_HOME/cards first, then the ones shipped
    with MedLens; None when there is none (the analysis then says it is unchecked)."""
    for folder in (cards_dir, PACKAGED_CARDS):
        if folder is None:
            continue
        path = ood_path(folder, fingerprint)
        if path.is_file():
            ref = read_ood(path)
            if ref.fingerprint == fingerprint:
                return ref
    return None


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
    ood: OodReference | None = None  # the out-of-distribution gate's reference, if fitted

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
    """The card in force for ``encoder`` (see the module docstring for the order), with
    its out-of-distribution reference (``find_ood``) attached."""
    from dataclasses import replace

    card = _card(encoder, cards_dir)
    return replace(card, ood=find_ood(encoder.fingerprint, cards_dir))


def _card(encoder: Any, cards_dir: Path | None) -> ModelCard:
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
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".card-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(card.to_dict(), fh, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path
