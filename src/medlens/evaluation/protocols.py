"""Run a named evaluation protocol (``protocols.yaml``) for one encoder.

A protocol is data: a dataset, a split, a *kind* and its options. Each kind has one
code path here (``classification``, ``binary``, ``retrieval``, ``domain``), and every
number goes through ``metrics`` with a bootstrap CI. Probabilities are computed the way
the pipeline computes them (prompt-ensemble similarities × logit scale, the model's
calibration temperature), so a protocol measures what a user of ``analyze`` gets.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from medlens import _yaml, embeddings
from medlens.analysis import calibration as C
from medlens.analysis import domain as domain_mod
from medlens.analysis import scoring
from medlens.analysis.triage import level_thresholds
from medlens.config import Settings, get_settings
from medlens.datasets import load_dataset
from medlens.datasets.manifest import Manifest, Record
from medlens.errors import ConfigError
from medlens.evaluation import metrics as M
from medlens.evaluation import plots
from medlens.knowledge import KnowledgePack, domains, load_domain
from medlens.models.base import ensemble
from medlens.models.card import Calibration, ModelCard, card_for

Advance = Callable[[int], None]
AdvanceFactory = Callable[[str, int], Advance]


@lru_cache(maxsize=1)
def _config() -> dict[str, Any]:
    text = resources.files("medlens.evaluation").joinpath("protocols.yaml").read_text("utf-8")
    return _yaml.safe_load(text)


def protocols() -> dict[str, dict[str, Any]]:
    """Protocol name → spec, in the file's order."""
    return _config()["protocols"]


def defaults() -> dict[str, Any]:
    return _config()["defaults"]


# -- environment -----------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What a number was measured on: cores, RAM, GPU, platform, library versions."""
    import torch

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram, 1),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        # Shared machines: a high load means the speed figures are pessimistic.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def model_info(encoder: Any, card: ModelCard) -> dict[str, Any]:
    """Which weights a result describes, from the model card."""
    return {
        "name": getattr(encoder, "name", "?"),
        "fingerprint": encoder.fingerprint,
        "trained_on": list(card.trained_on),
        "trained_at": card.trained_at,
        "calibration": bool(card.calibration),
    }


# -- embeddings, through the one embedding cache (medlens.embeddings) ----------------------
def embed_records(
    encoder: Any,
    manifest: Manifest,
    records: list[Record],
    advance: Advance | None = None,
    flips: Sequence[str] = (),
) -> np.ndarray:
    """Image embeddings of ``records``, cached by image content; with ``flips`` (a
    domain's ``test_time_flips``), the re-normalised mean over each image and its flips,
    exactly as ``MedLens.analyze`` scores them (each flip is its own cached view).

    Encoders with frozen backbones and trained heads (lite) cache the backbone features
    per *backbone* fingerprint, the same entries training uses, and apply the heads on
    top: retraining the heads never re-runs the backbone. Other encoders cache their
    embeddings per fingerprint.
    """
    views = [_embed_view(encoder, manifest, records, advance, f) for f in (None, *flips)]
    return views[0] if len(views) == 1 else ensemble(np.stack(views))


def _embed_view(
    encoder: Any,
    manifest: Manifest,
    records: list[Record],
    advance: Advance | None,
    flip: str | None,
) -> np.ndarray:
    """Embeddings of ``records`` (mirrored as ``flip`` names, if any), cached: misses are
    embedded 64 records at a time (forward batches of 32), as an uncached run does."""
    return embeddings.embed_records(
        encoder,
        manifest,
        records,
        store=embeddings.open_store(),
        flip=flip,
        batch_size=64,
        forward_batch=32,
        progress=advance,
    )


def embed_texts_cached(
    encoder: Any, texts: Sequence[str], advance: Advance | None = None
) -> np.ndarray:
    """Text embeddings cached by the hash of each text (only vectors and hashes reach
    the disk, never the text); misses are embedded 64 at a time."""
    return embeddings.embed_texts(
        encoder, texts, store=embeddings.open_store(), batch_size=64, progress=advance
    )


def select_records(
    manifest: Manifest,
    split: str | None,
    limit: int | None,
    where: dict[str, str] | None = None,
) -> list[Record]:
    """Records with an image in ``split`` (every split when None) whose ``meta`` matches
    ``where`` (e.g. ``{view: derm}``). With ``limit``, that many records evenly spaced
    through the selection (deterministic), so a smoke run still sees every class of a
    sorted dataset."""
    where = where or {}
    recs = [
        r
        for r in manifest.records
        if (split is None or r.split == split)
        and (r.path is not None or r.array_index is not None)
        and all(str(r.meta.get(k)) == str(v) for k, v in where.items())
    ]
    if limit and limit < len(recs):
        idx = np.linspace(0, len(recs) - 1, limit).round().astype(int)
        recs = [recs[i] for i in idx]
    return recs


# -- the entry point -----------------------------------------------------------------------
@dataclass
class Context:
    """Everything a kind's scorer needs besides its spec."""

    name: str
    spec: dict[str, Any]
    encoder: Any
    limit: int | None
    advance_factory: AdvanceFactory | None
    plot_dir: Path | None
    n_boot: int
    card: ModelCard
    settings: Settings

    def advance(self, label: str, total: int) -> Advance | None:
        return self.advance_factory(label, total) if self.advance_factory else None

    def embed(
        self, manifest: Manifest, recs: list[Record], label: str, for_scoring: bool = True
    ) -> np.ndarray:
        """Embeddings of ``recs`` in order, computed split by split (the batches, and the
        lite heads' pass over a split's features, are those of every earlier evaluation);
        each image's vector is cached by its content, whichever protocol (or training
        run) asked for it first. For scoring findings they include the domain's test-time
        flips, as ``analyze`` does; domain detection (``for_scoring=False``) uses the
        plain embedding, as ``analyze`` does."""
        flips = load_domain(manifest.domain).domain.test_time_flips if for_scoring else ()
        adv = self.advance(f"{label}: {manifest.name}", len(recs) * (1 + len(flips)))
        by_split: dict[str | None, list[int]] = {}
        for i, r in enumerate(recs):
            by_split.setdefault(r.split, []).append(i)
        if len(by_split) <= 1:
            return embed_records(self.encoder, manifest, recs, adv, flips)
        parts = {
            s: embed_records(self.encoder, manifest, [recs[i] for i in idx], adv, flips)
            for s, idx in by_split.items()
        }
        dim = next(iter(parts.values())).shape[1]
        out = np.empty((len(recs), dim), np.float32)
        for s, idx in by_split.items():
            out[idx] = parts[s]
        return out

    def ci(self, fn: Callable[..., float], *arrays: np.ndarray, groups: Any = None) -> list:
        b = defaults()["bootstrap"]
        lo, hi = M.bootstrap_ci(
            fn, *arrays, n=self.n_boot, seed=b["seed"], alpha=b["alpha"], groups=groups
        )
        return [_r(lo), _r(hi)]

    def plot(self, kind: str) -> Path | None:
        return self.plot_dir / f"{self.name}-{kind}.png" if self.plot_dir else None

    @property
    def calibration(self) -> Calibration:
        return self.card.calibration

    def logits(self, pack: KnowledgePack, emb: np.ndarray) -> np.ndarray:
        """(N, n_findings) finding logits by the one scoring rule (as analyze scores)."""
        return scoring.finding_logits(self.encoder, pack, emb, self.settings.cache_dir)


def run_protocol(
    name: str,
    encoder: Any,
    limit: int | None = None,
    advance_factory: AdvanceFactory | None = None,
    plot_dir: Path | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Run protocol ``name`` and return its metrics object (JSON-serialisable). With
    ``plot_dir``, also write its plots there (their file names are in ``plots``).
    ``settings`` (the caller's; read from the environment when None) locate the cache
    and the model cards."""
    settings = settings or get_settings()
    spec = protocols().get(name)
    if spec is None:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {', '.join(protocols())}")
    if limit is not None and limit < 1:
        raise ConfigError("limit must be at least 1")
    d = defaults()
    n_boot = d["smoke_bootstrap_n"] if limit else d["bootstrap"]["n"]
    card = card_for(encoder, settings.cards_dir)
    ctx = Context(name, spec, encoder, limit, advance_factory, plot_dir, n_boot, card, settings)
    started = time.time()
    kinds = {
        "classification": _classification,
        "binary": _binary,
        "retrieval": _retrieval,
        "domain": _domain,
    }
    if spec["kind"] not in kinds:
        raise ConfigError(f"protocol {name!r}: unknown kind {spec['kind']!r}")
    out = kinds[spec["kind"]](ctx)
    out = {
        "protocol": name,
        "title": spec.get("title", name),
        "kind": spec["kind"],
        **out,
        "model": model_info(encoder, ctx.card),
        "limit": limit,
        "bootstrap": {**d["bootstrap"], "n": ctx.n_boot},
        "anchors": spec.get("anchors") or [],
        "caveat": spec.get("caveat"),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "seconds": round(time.time() - started, 1),
    }
    if plot_dir is not None:
        out["plots"] = sorted(p.name for p in plot_dir.glob(f"{name}-*.png"))
    return out


# -- helpers -------------------------------------------------------------------------------
def _r(x: float, nd: int = 4) -> float | None:
    x = float(x)
    return round(x, nd) if np.isfinite(x) else None


def _dataset_block(ctx: Context, manifest: Manifest, n: int, **extra: Any) -> dict[str, Any]:
    expected = ctx.spec.get("version")
    return {
        "name": manifest.name,
        "version": manifest.version,
        "expected_version": expected,
        "version_matches": expected is None or expected == manifest.version,
        "split": ctx.spec.get("split"),
        "n": n,
        **extra,
    }


def _candidates(pack: KnowledgePack, manifest: Manifest) -> list[str]:
    """Findings the dataset's labels map to, in the pack's order."""
    return pack.candidates(manifest.vocab, manifest.label_set())


def _label_findings(pack: KnowledgePack, manifest: Manifest, rec: Record) -> list[str]:
    return pack.findings_for(manifest.vocab_of(rec), rec.labels)


def _probs_block(probs: np.ndarray, y: np.ndarray, bins: int) -> dict[str, float | None]:
    return {
        "ece": _r(M.ece(probs, y, bins)),
        "brier": _r(M.brier(probs, y)),
        "nll": _r(M.nll(probs, y)),
    }


def _calibration_block(
    ctx: Context,
    domain: str,
    to_probs: Callable[[float], np.ndarray],
    y: np.ndarray,
    fitted: float | None,
    fitted_on: str | None,
    model_probs: Callable[[float], np.ndarray] | None = None,
) -> dict[str, Any]:
    """ECE/Brier/NLL of the evaluated probabilities at T = 1, at the model's stored
    calibration (``model_probs``: temperature plus stored offsets, when it has them), and
    at a temperature fitted on the dataset's validation data."""
    bins = defaults()["ece_bins"]
    out: dict[str, Any] = {
        "ece_bins": bins,
        "uncalibrated": {"temperature": 1.0, **_probs_block(to_probs(1.0), y, bins)},
    }
    t_model = ctx.calibration.temperature.get(domain)
    out["model_temperature"] = (
        {
            "temperature": _r(t_model),
            "bias": model_probs is not None,
            **_probs_block((model_probs or to_probs)(t_model), y, bins),
        }
        if t_model
        else None
    )
    out["fitted_temperature"] = (
        {
            "temperature": _r(fitted),
            "fitted_on": fitted_on,
            **_probs_block(to_probs(fitted), y, bins),
        }
        if fitted
        else None
    )
    return out


def _reliability_plot(
    ctx: Context,
    title: str,
    to_probs: Callable[[float], np.ndarray],
    y: np.ndarray,
    cal: dict,
    model_probs: Callable[[float], np.ndarray] | None = None,
) -> None:
    if (path := ctx.plot("reliability")) is None:
        return
    series = {"T = 1": (to_probs(1.0), y)}
    for key, label in (("model_temperature", "model T"), ("fitted_temperature", "val-fitted T")):
        if cal.get(key):
            t = cal[key]["temperature"]
            if isinstance(t, dict):  # cross-fitted per fold
                series["cross-fitted T"] = (cal["_probs"], y)
            elif key == "model_temperature" and model_probs is not None:
                series[f"model T = {t:.2f} + offsets"] = (model_probs(t), y)
            else:
                series[f"{label} = {t:.2f}"] = (to_probs(t), y)
    plots.reliability_diagram(series, path, title, defaults()["ece_bins"])


def _fold_summary(values: list[float | None]) -> dict[str, float | None]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"mean": None, "sd": None}
    return {"mean": _r(v.mean()), "sd": _r(v.std(ddof=1) if len(v) > 1 else 0.0)}


# -- kind: classification (single-label differential) --------------------------------------
def _single_label_metrics(
    ctx: Context, y: np.ndarray, probs: np.ndarray, classes: list[str], groups: Any
) -> dict[str, Any]:
    pred = probs.argmax(1)
    per = M.per_class_sens_spec(y, pred, np.arange(len(classes)))
    return {
        "accuracy": _r(M.accuracy(y, pred)),
        "accuracy_ci": ctx.ci(M.accuracy, y, pred, groups=groups),
        "majority_class_accuracy": _r(np.bincount(y).max() / len(y)) if len(y) else None,
        "balanced_accuracy": _r(M.balanced_accuracy(y, pred)),
        "balanced_accuracy_ci": ctx.ci(M.balanced_accuracy, y, pred, groups=groups),
        "macro_auroc": _r(M.macro_auroc(y, probs)),
        "macro_auroc_ci": ctx.ci(M.macro_auroc, y, probs, groups=groups),
        "per_class": {
            classes[k]: {
                "recall": _r(v["sensitivity"]),
                "specificity": _r(v["specificity"]),
                "support": v["support"],
            }
            for k, v in per.items()
        },
    }


def _operating_point(
    ctx: Context,
    pack: KnowledgePack,
    finding: str,
    p: np.ndarray,
    positive: np.ndarray,
    groups: Any,
    probability: str,
) -> dict[str, Any]:
    """Sensitivity/specificity of ``finding`` at the triage threshold the pipeline uses:
    the model's stored per-finding threshold, else the policy's for its risk level."""
    stored = ctx.calibration.thresholds_for(pack.id).get(finding)
    risk = pack.finding(finding).risk
    if stored is not None:
        t, source = stored, "model's stored per-finding threshold"
    elif risk != "routine":
        t, source = level_thresholds(pack.id)[risk], f"triage policy ({pack.id}, {risk})"
    else:
        return {"finding": finding, "threshold": None, "note": "routine finding: no threshold"}
    pred = (p >= t).astype(int)
    y = positive.astype(int)
    rep = M.binary_report(y, pred)
    return {
        "finding": finding,
        "threshold": _r(t),
        "threshold_source": source,
        "probability": probability,
        "auroc": _r(M.binary_auroc(y, p)) if 0 < y.sum() < len(y) else None,
        "auroc_ci": ctx.ci(M.binary_auroc, y, p, groups=groups) if 0 < y.sum() < len(y) else None,
        "sensitivity": _r(rep["sensitivity"]),
        "sensitivity_ci": ctx.ci(M.sensitivity, y, pred, groups=groups),
        "specificity": _r(rep["specificity"]),
        "specificity_ci": ctx.ci(M.specificity, y, pred, groups=groups),
        "positives": int(y.sum()),
    }


@dataclass
class _Scores:
    """One modality's scores for the evaluated records."""

    full_logits: np.ndarray  # (N, n_findings): every finding of the domain
    cand_logits: np.ndarray  # (N, K): the dataset's candidate findings


def _modality_scores(
    ctx: Context,
    pack: KnowledgePack,
    manifest: Manifest,
    recs: list[Record],
    order: list[int],
    modality: str,
    cache: dict[str, np.ndarray],
) -> _Scores:
    if "image" not in cache:
        cache["image"] = ctx.logits(pack, ctx.embed(manifest, recs, ctx.name))
    if modality in ("symptoms", "fusion") and "symptoms" not in cache:
        texts = [r.text or "" for r in recs]
        emb = embed_texts_cached(ctx.encoder, texts, ctx.advance(f"{ctx.name}: text", len(texts)))
        cache["symptoms"] = ctx.logits(pack, emb)
    if modality == "fusion" and pack.domain.context is not None:
        full = cache["image"] + _context_shift(ctx, pack, manifest, recs)
    elif modality == "fusion":
        full = scoring.fuse(cache["image"], cache["symptoms"], scoring.SYMPTOM_WEIGHT)
    else:
        full = cache[modality]
    return _Scores(full, full[:, order])


def _context_shift(
    ctx: Context, pack: KnowledgePack, manifest: Manifest, recs: list[Record]
) -> np.ndarray:
    """(N, n_findings) the learned context fusion in raw-logit units, as ``analyze``
    applies it: softmax((z + b)/T + W c) = softmax((z + b + T·W c)/T), with the record's
    own metadata as the context; zero where the encoder has no fusion head."""
    from medlens.analysis import fusion
    from medlens.analysis.context import from_record, vocabulary

    head = fusion.find_head(ctx.encoder.fingerprint, pack.id, ctx.settings.cards_dir)
    if head is None:
        return np.zeros((len(recs), len(pack.finding_ids)))
    vocab = vocabulary(pack)
    t = ctx.calibration.temperature_for(pack.id)
    ids = pack.finding_ids
    return t * np.stack(
        [head.shift_for(ids, from_record(r.meta, manifest.name, vocab), vocab) for r in recs]
    )


def _softmax_at(logits: np.ndarray) -> Callable[[float], np.ndarray]:
    """Probabilities of ``logits`` as a function of the temperature."""
    return lambda t: scoring.probabilities(logits, "single_label", t)


def _classification(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    manifest = load_dataset(spec["dataset"])
    pack = load_domain(manifest.domain)
    classes = _candidates(pack, manifest)
    order = [pack.finding_ids.index(c) for c in classes]
    all_recs = select_records(manifest, spec.get("split"), ctx.limit, spec.get("where"))
    targets = [_label_findings(pack, manifest, r) for r in all_recs]
    recs = [r for r, t in zip(all_recs, targets, strict=True) if t]
    y = np.array([classes.index(t[0]) for t in targets if t])
    groups = np.array([r.group or r.id for r in recs]) if any(r.group for r in recs) else None
    bias = ctx.calibration.bias_for(pack.id, pack.finding_ids)
    fold_key = spec.get("folds")
    folds = np.array([int(r.meta[fold_key]) for r in recs]) if fold_key else None
    trained = spec["dataset"] in model_info(ctx.encoder, ctx.card)["trained_on"]

    out: dict[str, Any] = {
        "dataset": _dataset_block(
            ctx, manifest, len(recs), n_unlabelled=len(all_recs) - len(recs), classes=classes
        ),
        "domain": pack.id,
        "seen_in_training": _seen_note(trained, spec, recs),
    }
    cache: dict[str, np.ndarray] = {}
    modalities = spec.get("modalities") or ["image"]
    results: dict[str, Any] = {}
    for modality in modalities:
        s = _modality_scores(ctx, pack, manifest, recs, order, modality, cache)
        probs = scoring.calibrated(s.full_logits, pack, ctx.calibration, columns=order)
        res = _single_label_metrics(ctx, y, probs, classes, groups)
        if folds is not None:
            res["folds"] = _per_fold(ctx, y, probs, folds, recs, trained, groups)
        for k in spec.get("top_k") or []:
            res[f"top{k}_accuracy"] = _r(M.top_k_accuracy(y, probs, k))
            res[f"top{k}_accuracy_ci"] = ctx.ci(
                lambda yy, pp, k=k: M.top_k_accuracy(yy, pp, k), y, probs, groups=groups
            )
        for gname, g in (spec.get("binary_groups") or {}).items():
            res[gname] = _binary_group(ctx, y, probs, classes, g, groups)
        if (finding := spec.get("operating_point")) in classes:
            full_p = scoring.calibrated(s.full_logits, pack, ctx.calibration)
            k = pack.finding_ids.index(finding)
            res["operating_point"] = _operating_point(
                ctx,
                pack,
                finding,
                full_p[:, k],
                y == classes.index(finding),
                groups,
                f"softmax over all {len(pack.finding_ids)} {pack.id} findings, as in analyze()",
            )
        res["calibration"] = _classification_calibration(
            ctx, spec, manifest, pack, order, s, y, folds, bias[order]
        )
        if modality == modalities[0]:
            _classification_plots(
                ctx,
                y,
                probs,
                classes,
                res,
                spec,
                _softmax_at(s.cand_logits),
                _softmax_at(s.cand_logits + bias[order]),
            )
        for gname in spec.get("binary_groups") or {}:
            res[gname].pop("_curve")
        res["calibration"].pop("_probs", None)
        results[modality] = res
    if gspec := spec.get("group_scoring"):
        results["image"]["groups"] = _group_scores(ctx, pack, manifest, all_recs, gspec)
    if modalities == ["image"]:
        out.update(results["image"])
    else:
        out["modalities"] = results
        out.update({k: v for k, v in results[modalities[0]].items() if k != "folds"})
        out["folds"] = results[modalities[0]].get("folds")
        out["modality_notes"] = {
            "image": "image embedding vs the finding prompt ensembles; nothing is fitted per fold",
            "symptoms": "symptom-sentence embedding vs the same finding prompts (text→text); "
            "no symptom classifier is trained, nothing is fitted per fold",
            "fusion": "image + the record's clinical context (metadata) through the learned "
            "fusion head, as analyze applies it (fitted on validation splits by `medlens "
            "train fusion`; the symptom text is not mixed in)"
            if pack.domain.context is not None
            else f"the pipeline's fixed late fusion: image logits + "
            f"{scoring.SYMPTOM_WEIGHT} × symptom logits (untrained weight)",
        }
    return out


def _group_scores(
    ctx: Context,
    pack: KnowledgePack,
    manifest: Manifest,
    recs: list[Record],
    gspec: dict[str, Any],
) -> dict[str, Any]:
    """Scores in a coarser evaluation vocabulary (Derm7pt's 5 diagnosis groups): truth
    from ``meta[gspec["meta"]]``, which also covers records with no finding label; each
    group's probability is the sum of its findings' in the pipeline's differential (the
    softmax over all of the pack's findings), renormalised over the groups."""
    names = list(gspec["findings"])
    recs = [r for r in recs if r.meta.get(gspec["meta"]) in names]
    y = np.array([names.index(r.meta[gspec["meta"]]) for r in recs])
    groups = np.array([r.group or r.id for r in recs])
    full = scoring.calibrated(
        ctx.logits(pack, ctx.embed(manifest, recs, f"{ctx.name} (groups)")), pack, ctx.calibration
    )
    cols = [[pack.finding_ids.index(f) for f in gspec["findings"][g]] for g in names]
    probs = np.stack([full[:, c].sum(1) for c in cols], 1)
    probs = probs / np.clip(probs.sum(1, keepdims=True), 1e-12, None)
    out = _single_label_metrics(ctx, y, probs, names, groups)
    out["n"] = len(recs)
    out["findings"] = gspec["findings"]
    if (pos := gspec.get("positive")) in names:
        truth = (y == names.index(pos)).astype(int)
        out[f"{pos}_auroc"] = _r(M.binary_auroc(truth, probs[:, names.index(pos)]))
        out[f"{pos}_auroc_ci"] = ctx.ci(
            M.binary_auroc, truth, probs[:, names.index(pos)], groups=groups
        )
    return out


def _seen_note(trained: bool, spec: dict, recs: list[Record]) -> dict[str, Any]:
    """Which evaluated records the model's heads were trained (or early-stopped) on."""
    seen = sum(1 for r in recs if trained and r.split in ("train", "val"))
    return {
        "dataset_in_training_data": trained,
        "records_from_train_or_val_split": seen,
        "note": (
            "the model never saw this dataset"
            if not trained
            else "held out: the model was trained on this dataset's train split only"
            if not seen
            else f"{seen} of {len(recs)} evaluated records come from splits the model was "
            "trained or early-stopped on: read those folds as in-sample"
        ),
    }


def _per_fold(
    ctx: Context,
    y: np.ndarray,
    probs: np.ndarray,
    folds: np.ndarray,
    recs: list[Record],
    trained: bool,
    groups: Any,
) -> dict[str, Any]:
    """Metrics per fold, their mean ± sd, and the same over the folds the model never
    saw (with a patient-bootstrap CI over those folds' records pooled)."""
    rows = []
    for f in np.unique(folds):
        m = folds == f
        pred = probs[m].argmax(1)
        splits = sorted({r.split or "-" for r, keep in zip(recs, m, strict=True) if keep})
        rows.append(
            {
                "fold": int(f),
                "n": int(m.sum()),
                "split": ",".join(splits),
                "seen_by_model": trained and any(s in ("train", "val") for s in splits),
                "balanced_accuracy": _r(M.balanced_accuracy(y[m], pred)),
                "macro_auroc": _r(M.macro_auroc(y[m], probs[m])),
                "accuracy": _r(M.accuracy(y[m], pred)),
            }
        )
    held = [r for r in rows if not r["seen_by_model"]]
    out: dict[str, Any] = {
        "per_fold": rows,
        **{
            f"{k}_mean_sd": _fold_summary([r[k] for r in rows])
            for k in ("balanced_accuracy", "macro_auroc", "accuracy")
        },
        "held_out_folds": [r["fold"] for r in held],
        **{
            f"{k}_held_out_mean_sd": _fold_summary([r[k] for r in held])
            for k in ("balanced_accuracy", "macro_auroc")
        },
    }
    m = np.isin(folds, out["held_out_folds"])
    if m.any():
        g = groups[m] if groups is not None else None
        out["balanced_accuracy_held_out"] = _r(M.balanced_accuracy(y[m], probs[m].argmax(1)))
        out["macro_auroc_held_out"] = _r(M.macro_auroc(y[m], probs[m]))
        out["balanced_accuracy_held_out_ci"] = ctx.ci(
            M.balanced_accuracy, y[m], probs[m].argmax(1), groups=g
        )
        out["macro_auroc_held_out_ci"] = ctx.ci(M.macro_auroc, y[m], probs[m], groups=g)
    return out


def _binary_group(
    ctx: Context, y: np.ndarray, probs: np.ndarray, classes: list[str], g: dict, groups: Any
) -> dict[str, Any]:
    members = [classes.index(f) for f in g["findings"] if f in classes]
    score = probs[:, members].sum(1)
    truth = np.isin(y, members).astype(int)
    pred = (score >= float(g["threshold"])).astype(int)
    rep = M.binary_report(truth, pred)
    ok = 0 < truth.sum() < len(truth)
    return {
        "findings": list(g["findings"]),
        "threshold": g["threshold"],
        "positives": int(truth.sum()),
        "auroc": _r(M.binary_auroc(truth, score)) if ok else None,
        "auroc_ci": ctx.ci(M.binary_auroc, truth, score, groups=groups) if ok else None,
        **{k: _r(v) for k, v in rep.items()},
        "f1_ci": ctx.ci(M.f1, truth, pred, groups=groups),
        "sensitivity_ci": ctx.ci(M.sensitivity, truth, pred, groups=groups),
        "specificity_ci": ctx.ci(M.specificity, truth, pred, groups=groups),
        "_curve": (truth, score),
    }


def _classification_calibration(
    ctx: Context,
    spec: dict,
    manifest: Manifest,
    pack: KnowledgePack,
    order: list[int],
    s: _Scores,
    y: np.ndarray,
    folds: np.ndarray | None,
    bias: np.ndarray,
) -> dict[str, Any]:
    where = spec.get("calibration_split")
    fitted, fitted_on = None, None
    to_probs = _softmax_at(s.cand_logits)
    model_probs = _softmax_at(s.cand_logits + bias) if np.any(bias) else None
    if where == "cross_fit" and folds is not None:
        temps = {
            int(f): C.fit_temperature(s.cand_logits[folds != f], y[folds != f])
            for f in np.unique(folds)
        }

        def cross_fitted() -> np.ndarray:  # each fold at the temperature fitted without it
            out = np.empty_like(s.cand_logits)
            for f, tf in temps.items():
                m = folds == f
                out[m] = scoring.probabilities(s.cand_logits[m], "single_label", tf)
            return out

        bins = defaults()["ece_bins"]
        block = _calibration_block(ctx, pack.id, to_probs, y, None, None, model_probs)
        block["fitted_temperature"] = {
            "temperature": {str(f): _r(t) for f, t in temps.items()},
            "fitted_on": "the other four folds (cross-fitted)",
            **_probs_block(cross_fitted(), y, bins),
        }
        block["_probs"] = cross_fitted()  # for the reliability plot; removed there
        return block
    if where:
        vrecs = select_records(manifest, where, ctx.limit, spec.get("where"))
        vt = [_label_findings(pack, manifest, r) for r in vrecs]
        keep = [i for i, t in enumerate(vt) if t and t[0] in pack.finding_ids]
        vrecs = [vrecs[i] for i in keep]
        cand = [pack.finding_ids[i] for i in order]
        vy = np.array([cand.index(vt[i][0]) for i in keep])
        vlog = ctx.logits(pack, ctx.embed(manifest, vrecs, f"{ctx.name} ({where})"))
        fitted = C.fit_temperature(vlog[:, order], vy)
        fitted_on = f"{manifest.name} {where} split (n={len(vy)})"
    return _calibration_block(ctx, pack.id, to_probs, y, fitted, fitted_on, model_probs)


def _classification_plots(
    ctx: Context,
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    res: dict,
    spec: dict,
    to_probs: Callable[[float], np.ndarray],
    model_probs: Callable[[float], np.ndarray],
) -> None:
    if ctx.plot_dir is None:
        return
    short = f"{ctx.name} (n={len(y)})"
    plots.confusion_matrix(y, probs.argmax(1), classes, ctx.plot("confusion"), short)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    points: dict[str, tuple[float, float]] = {}
    if len(classes) <= 8:
        curves = {c: ((y == k).astype(int), probs[:, k]) for k, c in enumerate(classes)}
    for gname in spec.get("binary_groups") or {}:
        curves[f"{gname} vs rest"] = res[gname]["_curve"]
    if (op := res.get("operating_point")) and op.get("sensitivity") is not None:
        points[f"{op['finding']} @ {op['threshold']}"] = (op["sensitivity"], op["specificity"])
    if curves:
        plots.roc_curves(curves, ctx.plot("roc"), f"ROC, {short}", points)
    _reliability_plot(ctx, f"reliability, {short}", to_probs, y, res["calibration"], model_probs)


# -- kind: binary (one finding of a multi-label domain vs its reference) --------------------
def _binary(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    manifest = load_dataset(spec["dataset"])
    pack = load_domain(manifest.domain)
    finding = pack.map_label(manifest.vocab, spec["positive"])
    k = pack.finding_ids.index(finding)
    recs = select_records(manifest, spec["split"], ctx.limit)
    emb = ctx.embed(manifest, recs, ctx.name)
    z = ctx.logits(pack, emb)[:, k]
    y = np.array([finding in _label_findings(pack, manifest, r) for r in recs], dtype=int)
    p = scoring.calibrated(z[:, None], pack, ctx.calibration)[:, 0]
    pred = (p >= float(spec.get("threshold", 0.5))).astype(int)
    rep = M.binary_report(y, pred)
    groups = np.array([r.group or r.id for r in recs]) if any(r.group for r in recs) else None
    trained = spec["dataset"] in model_info(ctx.encoder, ctx.card)["trained_on"]
    out: dict[str, Any] = {
        "dataset": _dataset_block(ctx, manifest, len(recs), positives=int(y.sum())),
        "domain": pack.id,
        "seen_in_training": _seen_note(trained, spec, recs),
        "positive": finding,
        "probability": "sigmoid((finding logit − normal-reference logit) / T), as in analyze()",
        "threshold": spec.get("threshold", 0.5),
        "auroc": _r(M.binary_auroc(y, p)),
        "auroc_ci": ctx.ci(M.binary_auroc, y, p, groups=groups),
        "accuracy": _r(M.accuracy(y, pred)),
        "accuracy_ci": ctx.ci(M.accuracy, y, pred, groups=groups),
        "balanced_accuracy": _r(M.balanced_accuracy(y, pred)),
        **{k2: _r(v) for k2, v in rep.items()},
    }
    if op := spec.get("operating_point"):
        out["operating_point"] = _operating_point(
            ctx, pack, op, p, y.astype(bool), groups, out["probability"]
        )
    fitted = fitted_on = None
    if where := spec.get("calibration_split"):
        vrecs = select_records(manifest, where, ctx.limit)
        vemb = ctx.embed(manifest, vrecs, f"{ctx.name} ({where})")
        vz = ctx.logits(pack, vemb)[:, k]
        vy = np.array([finding in _label_findings(pack, manifest, r) for r in vrecs], dtype=int)
        fitted = C.fit_temperature_multilabel(vz[:, None], vy[:, None])
        fitted_on = f"{manifest.name} {where} split (n={len(vy)})"
    to_probs = lambda t: M.binary_probs(  # noqa: E731
        scoring.probabilities(z[:, None], "multi_label", t)[:, 0]
    )
    out["calibration"] = _calibration_block(ctx, pack.id, to_probs, y, fitted, fitted_on)
    if ctx.plot_dir is not None:
        short = f"{ctx.name} (n={len(y)})"
        plots.confusion_matrix(y, pred, ["normal", finding], ctx.plot("confusion"), short)
        pts = {}
        if (o := out.get("operating_point")) and o.get("sensitivity") is not None:
            pts[f"triage @ {o['threshold']}"] = (o["sensitivity"], o["specificity"])
        pts[f"@ {out['threshold']}"] = (rep["sensitivity"], rep["specificity"])
        plots.roc_curves({finding: (y, p)}, ctx.plot("roc"), f"ROC, {short}", pts)
        _reliability_plot(ctx, f"reliability, {short}", to_probs, y, out["calibration"])
    return out


# -- kind: retrieval (image ↔ text) + finding classification where labelled ---------------
def _retrieval(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    manifest = load_dataset(spec["dataset"])
    pack = load_domain(manifest.domain)
    recs = select_records(manifest, spec["split"], ctx.limit)
    emb = ctx.embed(manifest, recs, ctx.name)
    with_text = [i for i, r in enumerate(recs) if r.text and r.text.strip()]
    notes = sorted({recs[i].text for i in with_text})  # identical notes are one candidate
    note_of = np.array([notes.index(recs[i].text) for i in with_text])
    note_emb = embed_texts_cached(ctx.encoder, notes, ctx.advance(f"{ctx.name}: notes", len(notes)))
    sim = emb[with_text] @ note_emb.T  # (images, notes)
    rel = note_of[:, None] == np.arange(len(notes))[None, :]
    groups_img = np.array([recs[i].group or recs[i].id for i in with_text])
    first_group = {int(n): groups_img[int(np.argmax(note_of == n))] for n in np.unique(note_of)}
    groups_txt = np.array([first_group[j] for j in range(len(notes))])
    out: dict[str, Any] = {
        "dataset": _dataset_block(
            ctx, manifest, len(recs), n_images_with_notes=len(with_text), n_unique_notes=len(notes)
        ),
        "domain": pack.id,
        "seen_in_training": _seen_note(
            spec["dataset"] in model_info(ctx.encoder, ctx.card)["trained_on"], spec, recs
        ),
    }
    ranks = {}
    for direction, s, r, g, n_cand in (
        ("image_to_text", sim, rel, groups_img, len(notes)),
        ("text_to_image", sim.T, rel.T, groups_txt, len(with_text)),
    ):
        rk = M.retrieval_ranks(s, r)
        ranks[direction] = (rk, n_cand)
        block: dict[str, Any] = {"queries": len(rk), "candidates": n_cand}
        for k in spec.get("recall_at", [1, 5, 10]):
            block[f"recall_at_{k}"] = _r(M.recall_at_k(rk, k))
            block[f"recall_at_{k}_ci"] = ctx.ci(lambda a, k=k: M.recall_at_k(a, k), rk, groups=g)
            block[f"chance_recall_at_{k}"] = _r(min(1.0, k / max(n_cand, 1)))
        block["median_rank"] = _r(M.median_rank(rk))
        block["median_rank_ci"] = ctx.ci(M.median_rank, rk, groups=g)
        out[direction] = block
    # flat keys for the headline table
    for direction in ("image_to_text", "text_to_image"):
        for k in spec.get("recall_at", [1, 5, 10]):
            out[f"{direction}_recall_at_{k}"] = out[direction][f"recall_at_{k}"]
    out["classification"] = _multilabel_classification(ctx, manifest, pack, recs, emb)
    if ctx.plot_dir is not None:
        plots.recall_at_k_curves(
            {"image → notes": ranks["image_to_text"], "notes → image": ranks["text_to_image"]},
            ctx.plot("recall_at_k"),
            f"{ctx.name} (n={len(with_text)})",
        )
    return out


def _multilabel_classification(
    ctx: Context, manifest: Manifest, pack: KnowledgePack, recs: list[Record], emb: np.ndarray
) -> dict[str, Any]:
    """Top-1 finding among the dataset's findings, and per-finding probabilities as the
    pipeline's multi-label scoring gives them, on the labelled records."""
    classes = _candidates(pack, manifest)
    order = [pack.finding_ids.index(c) for c in classes]
    tg = [_label_findings(pack, manifest, r) for r in recs]
    keep = [i for i, t in enumerate(tg) if t]
    if not keep:
        return {"n": 0}
    z_all = ctx.logits(pack, emb[keep])
    z = z_all[:, order]

    def probs(t: float) -> np.ndarray:
        """As the pipeline scores: every finding, made consistent, then these columns."""
        return scoring.probabilities(z_all, pack.task, t, exclusions=pack.exclusions)[:, order]

    target = np.array([[c in tg[i] for c in classes] for i in keep], dtype=int)
    y = np.array([classes.index(tg[i][0]) for i in keep])
    pred = z.argmax(1)
    hit = target[np.arange(len(keep)), pred].astype(int)
    groups = np.array([recs[i].group or recs[i].id for i in keep])
    t_model = ctx.calibration.temperature_for(pack.id)
    out: dict[str, Any] = {
        "n": len(keep),
        "classes": classes,
        "support": {c: int(target[:, k].sum()) for k, c in enumerate(classes)},
        "accuracy": _r(hit.mean()),
        "accuracy_ci": ctx.ci(lambda h: float(h.mean()), hit, groups=groups),
        "majority_class_accuracy": _r(target.sum(0).max() / len(keep)),
        "balanced_accuracy": _r(M.balanced_accuracy(y, pred)),
        "macro_auroc": _r(M.macro_auroc(target, probs(t_model))),
        "note": "top-1 = highest-scoring of the findings this dataset's labels map to; "
        "AUROC per finding (one-vs-rest) where both classes occur",
    }
    # Calibration of the per-finding probabilities (every record × finding pair).
    flat_y = target.ravel()

    def to_probs(t: float) -> np.ndarray:
        return M.binary_probs(probs(t).ravel())

    fitted = fitted_on = None
    if where := ctx.spec.get("calibration_split"):
        vrecs = select_records(manifest, where, ctx.limit)
        vt = [_label_findings(pack, manifest, r) for r in vrecs]
        vkeep = [i for i, t in enumerate(vt) if t]
        if vkeep:
            vemb = ctx.embed(manifest, [vrecs[i] for i in vkeep], f"{ctx.name} ({where})")
            vz = ctx.logits(pack, vemb)[:, order]
            vtarget = np.array([[c in vt[i] for c in classes] for i in vkeep], dtype=int)
            fitted = C.fit_temperature_multilabel(vz, vtarget)
            fitted_on = f"{manifest.name} {where} split (n={len(vkeep)}, labelled)"
    out["calibration"] = _calibration_block(ctx, pack.id, to_probs, flat_y, fitted, fitted_on)
    out["calibration"]["unit"] = "per (image, finding) pair, multi-label probabilities"
    if ctx.plot_dir is not None:
        short = f"{ctx.name} findings (n={len(keep)})"
        plots.confusion_matrix(y, pred, classes, ctx.plot("confusion"), short)
        p = probs(t_model)
        plots.roc_curves(
            {c: (target[:, k], p[:, k]) for k, c in enumerate(classes)},
            ctx.plot("roc"),
            f"ROC, {short}",
        )
        _reliability_plot(ctx, f"reliability, {short}", to_probs, flat_y, out["calibration"])
    return out


# -- kind: domain --------------------------------------------------------------------------
def _domain(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    per: dict[str, Any] = {}
    ys, probs = [], []
    versions = {}
    for name in spec["datasets"]:
        manifest = load_dataset(name)
        versions[name] = manifest.version
        if manifest.arrays is not None:
            recs = select_records(manifest, spec["split"], ctx.limit)
            emb = ctx.embed(manifest, recs, ctx.name, for_scoring=False)
        else:  # every image, split by split (``limit`` per split) so caches are shared
            splits = list(dict.fromkeys(r.split for r in manifest.records))
            splits = [None] if None in splits else splits  # None selects every record
            each = max(1, ctx.limit // len(splits)) if ctx.limit else None
            parts = [select_records(manifest, s, each) for s in splits]
            recs = [r for rs in parts for r in rs]
            emb = ctx.embed(manifest, recs, ctx.name, for_scoring=False)
        p = domain_mod.domain_scores(emb, ctx.encoder, ctx.settings.cache_dir)
        truth = domains().index(manifest.domain)
        per[name] = {
            "n": len(recs),
            "domain": manifest.domain,
            "accuracy": _r(float(np.mean(p.argmax(1) == truth))),
        }
        ys.append(np.full(len(recs), truth))
        probs.append(p)
    y, p = np.concatenate(ys), np.concatenate(probs)
    pred = p.argmax(1)
    bins = defaults()["ece_bins"]
    out = {
        "dataset": {"name": "all samples", "versions": versions, "n": len(y)},
        "accuracy": _r(M.accuracy(y, pred)),
        "accuracy_ci": ctx.ci(M.accuracy, y, pred),
        "balanced_accuracy": _r(M.balanced_accuracy(y, pred)),
        "n": len(y),
        "per_dataset": per,
        "calibration": {"ece_bins": bins, "uncalibrated": _probs_block(p, y, bins)},
    }
    if ctx.plot_dir is not None:
        plots.confusion_matrix(
            y, pred, list(domains()), ctx.plot("confusion"), f"domain (n={len(y)})"
        )
    return out
