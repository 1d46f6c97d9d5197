"""Calibrate an encoder on validation splits: a temperature per domain (plus, for
single-label domains, per-finding logit offsets: bias-corrected temperature scaling) and
per-finding triage thresholds chosen for a target sensitivity on every validation
source (pooled and per dataset).

Probabilities are computed exactly as ``MedLens.analyze`` computes them from an image
(prompt-ensemble similarities × the encoder's logit scale; dermatology: softmax over
*all* dermatology findings; chest X-ray: per-finding sigmoid against the "normal study"
reference), so a threshold chosen here means the same thing in the pipeline. Only
validation splits are read; test splits stay untouched for ``medlens eval``.

The result is what ``LiteEncoder.calibration`` holds (``meta["calibration"]`` of the heads
file): ``{"temperature": {domain: T}, "bias": {domain: {finding: b}},
"thresholds": {domain: {finding: p}}, ...}``; probabilities are softmax((z + b) / T).
Symptom text is not part of the fit: with symptoms the pipeline adds a symptom term to
the logits, and the image-only temperature and thresholds are applied unchanged.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.analysis import calibration as C
from medlens.analysis import scoring
from medlens.config import get_settings
from medlens.datasets import load_dataset
from medlens.datasets.manifest import Manifest, Record
from medlens.errors import ConfigError, ModelUnavailable
from medlens.evaluation import metrics as M
from medlens.knowledge import KnowledgePack, load_domain, training_datasets

SPLIT = "val"
ECE_BINS = 15
MIN_POSITIVES = 5  # below this a sensitivity on validation says nothing
# A single source binds the threshold only with this many positives: with fewer, its
# 0.90 quantile is its one lowest positive, and one odd case would set the operating
# point for every user (7 PAD-UFES-20 melanomas cost 0.6 specificity on DermaMNIST).
MIN_SOURCE_POSITIVES = 20
THRESHOLD_DECIMALS = 6  # stored thresholds are rounded *down*: sensitivity never drops

AdvanceFactory = Callable[[str, int], Callable[[int], None] | None]


@dataclass
class DomainData:
    """Validation scores of one domain, pooled over its datasets, as arrays."""

    pack: KnowledgePack
    logits: list[np.ndarray] = field(default_factory=list)  # (n, K) ``scoring.finding_logits``
    targets: list[np.ndarray] = field(default_factory=list)  # (n,) index | (n, K) multi-hot
    mask: list[np.ndarray] = field(default_factory=list)  # (n, K) labelled entries
    source: list[np.ndarray] = field(default_factory=list)  # (n,) dataset name

    def stacked(self) -> dict[str, np.ndarray]:
        out = {
            "logits": np.concatenate(self.logits),
            "targets": np.concatenate(self.targets),
            "source": np.concatenate(self.source),
        }
        if self.pack.task == "multi_label":
            out["z"] = out["logits"]  # already relative to the reference
            out["mask"] = np.concatenate(self.mask)
        return out


def _val_records(manifest: Manifest, limit: int | None) -> list[Record]:
    from medlens.evaluation.protocols import select_records

    return select_records(manifest, SPLIT, limit)


def collect(
    encoder: Any,
    data: Sequence[str],
    limit: int | None = None,
    advance_factory: AdvanceFactory | None = None,
    cache_dir: Path | None = None,
) -> dict[str, DomainData]:
    """Scaled similarities of every labelled validation image, grouped by domain.

    Embeddings come through the embedding cache (``embed_records``): for lite, the frozen
    backbone features training already computed, so this costs one head pass.
    """
    from medlens.evaluation.protocols import embed_records

    prompt_cache = cache_dir or get_settings().cache_dir  # the one embedding cache
    domains: dict[str, DomainData] = {}
    for name in data:
        manifest = load_dataset(name)
        pack = load_domain(manifest.domain)
        recs = _val_records(manifest, limit)
        found = [pack.findings_for(manifest.vocab_of(r), r.labels) for r in recs]
        keep = [i for i, f in enumerate(found) if f]
        if not keep:
            continue
        recs = [recs[i] for i in keep]
        found = [found[i] for i in keep]
        flips = pack.domain.test_time_flips  # scored as analyze() scores them
        total = len(recs) * (1 + len(flips))
        adv = advance_factory(f"{name} ({SPLIT})", total) if advance_factory else None
        emb = embed_records(encoder, manifest, recs, adv, flips)
        d = domains.setdefault(pack.id, DomainData(pack))
        d.logits.append(scoring.finding_logits(encoder, pack, emb, prompt_cache))
        d.source.append(np.array([name] * len(recs)))
        ids = pack.finding_ids
        if pack.task == "single_label":
            d.targets.append(np.array([ids.index(f[0]) for f in found]))
            continue
        covered = np.array([manifest.vocab in f.labels for f in pack.findings])
        hot = np.zeros((len(recs), len(ids)), np.float32)
        for i, fs in enumerate(found):
            hot[i, [ids.index(f) for f in fs]] = 1.0
        d.targets.append(hot)
        d.mask.append(np.repeat(covered[None, :], len(recs), axis=0))
    return domains


# -- metrics -------------------------------------------------------------------------------
def _r(x: float, nd: int = 4) -> float | None:
    return round(float(x), nd) if np.isfinite(x) else None


def probabilities(
    d: dict[str, np.ndarray], task: str, temperature: float, bias: np.ndarray | None = None
) -> np.ndarray:
    """(N, K) probabilities as the pipeline computes them at ``temperature`` (and the
    per-finding ``bias`` of single-label domains)."""
    return scoring.probabilities(d["logits"], task, temperature, bias)


def _ece(d: dict[str, np.ndarray], task: str, p: np.ndarray, rows: np.ndarray) -> float:
    """Top-1 ECE for a differential; for multi-label, ECE of the per-finding binary
    predictions over the labelled (image, finding) entries."""
    if task == "single_label":
        return M.ece(p[rows], d["targets"][rows], ECE_BINS)
    m = d["mask"] & rows[:, None]
    return M.ece(M.binary_probs(p[m]), d["targets"][m].astype(int), ECE_BINS)


def _nll(
    d: dict[str, np.ndarray], task: str, t: float, rows: np.ndarray, bias: Any = None
) -> float:
    if task == "single_label":
        z = d["logits"][rows] if bias is None else d["logits"][rows] + bias
        return C.softmax_nll(z, d["targets"][rows], t)
    return C.sigmoid_nll(d["z"][rows], d["targets"][rows], t, d["mask"][rows])


def fit_domain(d: dict[str, np.ndarray], task: str) -> tuple[float, np.ndarray | None]:
    """(temperature, per-finding bias or None): bias-corrected temperature scaling for a
    differential, a temperature alone for per-finding sigmoids."""
    if task == "single_label":
        return C.fit_temperature_and_bias(d["logits"], d["targets"])
    return C.fit_temperature_multilabel(d["z"], d["targets"], d["mask"]), None


def threshold_for_sensitivity(p: np.ndarray, positive: np.ndarray, target: float) -> float:
    """The largest threshold t with sensitivity(p >= t) >= target, rounded down to
    ``THRESHOLD_DECIMALS`` so float noise in the pipeline cannot lose a positive."""
    pos = np.sort(np.asarray(p, dtype=np.float64)[np.asarray(positive, dtype=bool)])[::-1]
    if not len(pos):
        raise ValueError("no positives to choose a threshold on")
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    scale = 10**THRESHOLD_DECIMALS
    return math.floor(float(pos[k - 1]) * scale) / scale


def _sens_spec(p: np.ndarray, y: np.ndarray, t: float) -> dict[str, Any]:
    pred = (p >= t).astype(int)
    y = y.astype(int)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    return {
        "sensitivity": _r(M.sensitivity(y, pred)) if n_pos else None,
        "specificity": _r(M.specificity(y, pred)) if n_neg else None,
        "positives": n_pos,
        "negatives": n_neg,
    }


def _thresholds(
    d: dict[str, np.ndarray], pack: KnowledgePack, p: np.ndarray, target: float
) -> tuple[dict[str, float], dict[str, Any]]:
    thresholds: dict[str, float] = {}
    report: dict[str, Any] = {}
    for k, f in enumerate(pack.findings):
        if f.risk != "urgent":
            continue
        if pack.task == "single_label":
            rows = np.ones(len(p), bool)
            y = d["targets"] == k
        else:
            rows = d["mask"][:, k]
            y = d["targets"][:, k] > 0
        n_pos = int(y[rows].sum())
        if n_pos == 0:
            continue
        if n_pos < MIN_POSITIVES:
            report[f.id] = {"threshold": None, "positives": n_pos, "note": "too few positives"}
            continue
        # The operating point must hold on every validation source with enough
        # positives (MIN_SOURCE_POSITIVES), not only on the pool, where the largest
        # dataset dominates: the lowest of the pooled and per-source thresholds is kept.
        t = threshold_for_sensitivity(p[rows, k], y[rows], target)
        binding = "all (pooled)"
        for src in np.unique(d["source"][rows]):
            sel = rows & (d["source"] == src)
            if int(y[sel].sum()) >= MIN_SOURCE_POSITIVES:
                ts = threshold_for_sensitivity(p[sel, k], y[sel], target)
                if ts < t:
                    t, binding = ts, str(src)
        thresholds[f.id] = t
        per_dataset = {
            str(src): _sens_spec(
                p[rows & (d["source"] == src), k], y[rows & (d["source"] == src)], t
            )
            for src in np.unique(d["source"][rows])
        }
        report[f.id] = {
            "threshold": t,
            "set_by": binding,
            **_sens_spec(p[rows, k], y[rows], t),
            "per_dataset": per_dataset,
        }
    return thresholds, report


def calibrate(
    encoder_name: str = "lite",
    data: Sequence[str] | None = None,
    target_sensitivity: float = 0.90,
    *,
    encoder: Any = None,
    limit: int | None = None,
    advance_factory: AdvanceFactory | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Fit temperatures and choose urgent-finding thresholds on validation splits
    (embeddings through the cache in ``cache_dir``, default ``MEDLENS_HOME/cache``).

    Returns ``{"temperature": {domain: T}, "thresholds": {domain: {finding: t}},
    "target_sensitivity", "fitted_on", "report"}``; ``report`` holds ECE/NLL before and
    after per domain and dataset, and sensitivity/specificity at every threshold (pooled
    and per dataset: operating points do not travel between datasets).
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ConfigError("target sensitivity must be in (0, 1]")
    data = training_datasets() if data is None else tuple(data)
    if not data:
        raise ConfigError("give at least one dataset to calibrate on")
    if encoder is None:
        from medlens.models import load_encoder

        encoder = load_encoder(encoder_name)
    domains = collect(encoder, data, limit, advance_factory, cache_dir)
    if not domains:
        raise ConfigError(f"no labelled {SPLIT} images in {', '.join(data)}")
    out: dict[str, Any] = {
        "temperature": {},
        "bias": {},
        "thresholds": {},
        "target_sensitivity": target_sensitivity,
        "split": SPLIT,
        "fitted_on": {},
        "fitted_at": time.strftime("%Y-%m-%d"),
        "encoder_fingerprint": encoder.fingerprint,
        "report": {},
    }
    for domain, dd in domains.items():
        d, task = dd.stacked(), dd.pack.task
        # Rounded first: the stored values are the ones thresholds are chosen under.
        t, bias = fit_domain(d, task)
        t = round(t, 4)
        if bias is not None:
            bias = np.round(bias, 4)
            out["bias"][domain] = {
                f.id: float(b) for f, b in zip(dd.pack.findings, bias, strict=True)
            }
        p0, p1 = probabilities(d, task, 1.0), probabilities(d, task, t, bias)
        everything = np.ones(len(d["source"]), bool)
        per_dataset = {}
        for src in np.unique(d["source"]):
            rows = d["source"] == src
            per_dataset[str(src)] = {
                "n": int(rows.sum()),
                "ece_before": _r(_ece(d, task, p0, rows)),
                "ece_after": _r(_ece(d, task, p1, rows)),
            }
        thresholds, th_report = _thresholds(d, dd.pack, p1, target_sensitivity)
        out["temperature"][domain] = t
        out["thresholds"][domain] = thresholds
        out["report"][domain] = {
            "task": task,
            "n": len(d["source"]),
            "probability": (
                f"softmax over all {len(dd.pack.findings)} findings"
                if task == "single_label"
                else "per-finding sigmoid against the reference, labelled findings only"
            ),
            "temperature": t,
            "nll_before": _r(_nll(d, task, 1.0, everything)),
            "nll_after": _r(_nll(d, task, t, everything, bias)),
            "ece_before": _r(_ece(d, task, p0, everything)),
            "ece_after": _r(_ece(d, task, p1, everything)),
            "datasets": per_dataset,
            "thresholds": th_report,
        }
        for src, block in per_dataset.items():
            out["fitted_on"][src] = {"split": SPLIT, "n": block["n"]}
    for name in out["fitted_on"]:
        out["fitted_on"][name]["version"] = load_dataset(name).version
    return out


# -- persistence --------------------------------------------------------------------------
def write_calibration(heads_path: Path | str, calibration: dict[str, Any]) -> Path:
    """Rewrite a lite heads file with ``meta["calibration"]`` set, atomically.

    The tensors are written back unchanged (same names, dtypes and bytes), so the
    encoder's fingerprint, which hashes the tensors, does not change: prompt, embedding
    and vector caches stay valid because calibration never changes an embedding.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save_file

    path = Path(heads_path)
    if not path.is_file():
        raise ModelUnavailable(f"no heads file at {path} to write the calibration into")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        state = load_file(str(path))
        meta = json.loads(metadata.get("meta", "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot read the heads file {path}: {exc}") from exc
    meta["calibration"] = calibration
    metadata["meta"] = json.dumps(meta, sort_keys=True, default=str)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, path.stat().st_mode & 0o777)  # mkstemp's 0600 must not stick
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_card_calibration(encoder: Any, calibration: dict[str, Any], cards_dir: Path) -> Path:
    """Store ``calibration`` in the model card of ``encoder`` under ``cards_dir`` (keyed by
    its fingerprint): how any backend (open_clip, hf, a local lite) is calibrated."""
    from dataclasses import replace

    from medlens.models.card import Calibration, card_for, write_card

    card = replace(card_for(encoder), calibration=Calibration.from_dict(calibration))
    return write_card(card, cards_dir)
