"""Does the clinical context help? Image alone vs context alone vs learned fusion (issue 15).

Usage: MEDLENS_DATA=../shared/data python benchmarks/fusion.py [--part a|a2|b|all|none]
           [--out docs/fusion.md] [--json benchmarks/results/fusion.json] [--boot 1000]

Part A, PAD-UFES-20 patient-grouped 5-fold cross-validation (the loader's folds: no
patient in two folds). The shipped image model trained on PAD folds 0-2, so it cannot be
scored on them fairly; here every fold is trained without its test patients on top of
the *ImageNet* MobileNetV2 (the lite backbone before any dermatology training; pooled
1280-d features, mean of the image and its horizontal flip):
- image only: multinomial logistic regression on the image features;
- context only: the same on the encoded context (``analysis.fusion.encode``);
- fusion (stacked, the shipped rule): image log-probabilities (out-of-fold within the
  training folds) + W·context, W fitted as ``training.fusion`` fits it;
- fusion (joint): one logistic regression on [image features, context];
- each fusion without Fitzpatrick, and a *leak probe*: with missing-field indicators.
Regularisation C is chosen by grouped inner cross-validation on the training folds.
Balanced accuracy of the pooled out-of-fold predictions, 95 % CIs by patient bootstrap.
Subgroups by Fitzpatrick type, sex and age band.

Part B, the shipped model (``lite``) and its fusion head (fitted on validation splits
by ``medlens train fusion``) on test splits it never saw: HAM10000 test, Derm7pt test
(each view), PAD-UFES-20 test fold: balanced accuracy over the dataset's findings,
melanoma AUROC, ECE, and melanoma / carcinoma sensitivity at the stored triage
thresholds, image alone vs with context (raw fused, and with the pipeline's rule that
context never lowers a triage). Part C: Derm7pt's two views of one lesion, single view
vs the pair (mean of the two views' calibrated logits).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FEATURES = ROOT / "runs" / "fusion"
CS = (0.01, 0.1, 1.0, 10.0)
AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))
CARCINOMAS = ("basal_cell_carcinoma", "squamous_cell_carcinoma")


# ----------------------------------------------------------------------------- helpers
def bal_acc(y: np.ndarray, pred: np.ndarray) -> float:
    from medlens.evaluation import metrics as M

    return float(M.balanced_accuracy(y, pred))


def boot_ci(y, pred, groups, n=1000, seed=0) -> tuple[float, float]:
    """95 % CI of balanced accuracy by resampling patients (groups) with replacement."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    idx = {g: np.flatnonzero(groups == g) for g in uniq}
    vals = []
    for _ in range(n):
        pick = np.concatenate([idx[g] for g in rng.choice(uniq, len(uniq))])
        if len(np.unique(y[pick])) == len(np.unique(y)):
            vals.append(bal_acc(y[pick], pred[pick]))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return round(float(lo), 3), round(float(hi), 3)


def imagenet_features(records) -> np.ndarray:
    """(N, 1280) ImageNet MobileNetV2 pooled features (mean with the h-flip), cached."""
    import hashlib

    import torch

    from medlens.io import load_image
    from medlens.models import load_encoder
    from medlens.models.lite import _build_mobilenet_v2

    key = hashlib.sha256("\n".join(str(r.path) for r in records).encode()).hexdigest()[:16]
    path = FEATURES / f"imagenet_mnv2_{key}.npy"
    if path.is_file():
        return np.load(path)
    enc = load_encoder("lite")  # its preprocessing (size, colour constancy) only
    net = _build_mobilenet_v2().eval()
    torch.set_grad_enabled(False)
    out = []
    for i in range(0, len(records), 32):
        imgs = [load_image(r.path).pixels for r in records[i : i + 32]]
        x = enc.preprocess(imgs).float()
        f = (net(x) + net(torch.flip(x, dims=[3]))) / 2
        out.append(f.numpy())
        print(f"  features {i + len(imgs)}/{len(records)}", file=sys.stderr, flush=True)
    feats = np.concatenate(out)
    FEATURES.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    return feats


def inner_c(x, y, groups, weighted=True) -> float:
    """C by grouped 3-fold inner cross-validation (balanced accuracy)."""
    from sklearn.model_selection import GroupKFold

    best, best_c = -1.0, CS[0]
    for c in CS:
        preds = np.empty_like(y)
        for tr, te in GroupKFold(3).split(x, y, groups):
            preds[te] = lr(x[tr], y[tr], c, weighted).predict(x[te])
        s = bal_acc(y, preds)
        if s > best:
            best, best_c = s, c
    return best_c


def lr(x, y, c, weighted=True):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=c, max_iter=3000, class_weight="balanced" if weighted else None),
    ).fit(x, y)


def oof_logprob(x, y, groups, c) -> np.ndarray:
    """Out-of-fold log-probabilities within the training folds (grouped 5-fold)."""
    from sklearn.model_selection import GroupKFold

    out = np.zeros((len(y), len(np.unique(y))))
    for tr, te in GroupKFold(5).split(x, y, groups):
        out[te] = lr(x[tr], y[tr], c).predict_log_proba(x[te])
    return out


def with_indicators(ctx_list, vocab, fields) -> np.ndarray:
    """The context encoding plus one missing-field indicator per field (the leak probe)."""
    from medlens.analysis import fusion as F

    base = np.stack([F.encode(c, vocab, fields) for c in ctx_list])
    ind = []
    for c in ctx_list:
        given = {g.split(".")[0] for g in c.given()}
        ind.append([0.0 if f in given else 1.0 for f in fields])
    return np.hstack([base, np.array(ind)])


# ------------------------------------------------------------------ part A: PAD CV
def pad_cv_data():
    """PAD-UFES-20 records with a label: vocabulary, records, classes, labels, patient
    groups, the loader's patient-grouped folds and each record's clinical context."""
    from medlens.analysis.context import from_record
    from medlens.datasets import load_dataset
    from medlens.knowledge import load_domain

    vocab = load_domain("dermatology").domain.context
    m = load_dataset("pad_ufes_20")
    recs = [r for r in m.records if r.labels]
    classes = sorted({r.labels[0] for r in recs})
    y = np.array([classes.index(r.labels[0]) for r in recs])
    groups = np.array([r.group for r in recs])
    folds = np.array([int(r.meta["fold"]) for r in recs])
    ctxs = [from_record(r.meta, "pad_ufes_20", vocab) for r in recs]
    return vocab, recs, classes, y, groups, folds, ctxs


def part_a(n_boot: int) -> dict:
    from medlens.analysis import fusion as F
    from medlens.training.fusion import fit_weight

    vocab, recs, classes, y, groups, folds, ctxs = pad_cv_data()
    x_img = imagenet_features(recs)
    all_fields = F.FIELDS
    no_fitz = tuple(f for f in F.FIELDS if f != "fitzpatrick")
    enc = {
        "all": np.stack([F.encode(c, vocab, all_fields) for c in ctxs]),
        "no_fitz": np.stack([F.encode(c, vocab, no_fitz) for c in ctxs]),
        "indicators": with_indicators(ctxs, vocab, all_fields),
    }
    variants = {
        "image only": lambda tr: ("img", None),
        "context only": lambda tr: ("ctx", "all"),
        "context only, no Fitzpatrick": lambda tr: ("ctx", "no_fitz"),
        "missingness indicators only": lambda tr: ("miss", None),
        "fusion, stacked (shipped rule)": lambda tr: ("stack", "all"),
        "fusion, stacked, no Fitzpatrick": lambda tr: ("stack", "no_fitz"),
        "fusion, joint LR": lambda tr: ("joint", "all"),
        "fusion, joint LR, no Fitzpatrick": lambda tr: ("joint", "no_fitz"),
        "fusion, joint LR + missing indicators (leak probe)": lambda tr: ("joint", "indicators"),
    }
    miss = enc["indicators"][:, -len(all_fields) :]
    preds = {k: np.empty_like(y) for k in variants}
    for k in range(5):
        tr, te = folds != k, folds == k
        t0 = time.time()
        c_img = inner_c(x_img[tr], y[tr], groups[tr])
        m_img = lr(x_img[tr], y[tr], c_img)
        lp_tr = oof_logprob(x_img[tr], y[tr], groups[tr], c_img)
        lp_te = m_img.predict_log_proba(x_img[te])
        for name, spec in variants.items():
            kind, e = spec(tr)
            if kind == "img":
                p = m_img.predict(x_img[te])
            elif kind == "ctx":
                c = inner_c(enc[e][tr], y[tr], groups[tr])
                p = lr(enc[e][tr], y[tr], c).predict(enc[e][te])
            elif kind == "miss":
                c = inner_c(miss[tr], y[tr], groups[tr])
                p = lr(miss[tr], y[tr], c).predict(miss[te])
            elif kind == "stack":
                # class-balanced decision: subtract log priors of the training folds, as
                # the balanced image model does, then W by the shipped fit
                w = fit_weight(lp_tr, enc[e][tr], y[tr], range(len(classes)), 1e-3)
                p = np.argmax(
                    lp_te + enc[e][te] @ w.T - np.log(np.bincount(y[tr]) / tr.sum()), axis=1
                )
            else:
                xj = np.hstack([x_img, enc[e]])
                c = inner_c(xj[tr], y[tr], groups[tr])
                p = lr(xj[tr], y[tr], c).predict(xj[te])
            preds[name][te] = p
        print(f"fold {k} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for name, p in preds.items():
        per_fold = [bal_acc(y[folds == k], p[folds == k]) for k in range(5)]
        rows.append(
            {
                "model": name,
                "balanced_accuracy": round(bal_acc(y, p), 3),
                "ci95": boot_ci(y, p, groups, n_boot),
                "fold_mean": round(float(np.mean(per_fold)), 3),
                "fold_sd": round(float(np.std(per_fold)), 3),
            }
        )

    # subgroups: image vs the shipped-rule fusion without Fitzpatrick
    def band(c):
        return next(b for lo, hi, b in AGE_BANDS if lo <= c.age < hi) if c.age is not None else "?"

    keys = {
        "Fitzpatrick": [
            "unknown"
            if c.fitzpatrick is None
            else ("4-6" if c.fitzpatrick >= 4 else str(c.fitzpatrick))
            for c in ctxs
        ],
        "sex": [c.sex or "unknown" for c in ctxs],
        "age band": [band(c) for c in ctxs],
    }
    sub = []
    for by, vals in keys.items():
        vals = np.array(vals)
        for v in sorted(set(vals)):
            sel = vals == v
            sub.append(
                {
                    "by": by,
                    "group": v,
                    "n": int(sel.sum()),
                    "image": round(bal_acc(y[sel], preds["image only"][sel]), 3),
                    "fusion": round(
                        bal_acc(y[sel], preds["fusion, stacked, no Fitzpatrick"][sel]), 3
                    ),
                    "fusion_joint": round(
                        bal_acc(y[sel], preds["fusion, joint LR, no Fitzpatrick"][sel]), 3
                    ),
                }
            )
    return {
        "n": len(y),
        "patients": len(np.unique(groups)),
        "classes": classes,
        "rows": rows,
        "subgroups": sub,
    }


# --------------------------------------- part A2: the last blocks fine-tuned per fold
FINETUNE_FROM = 14  # MobileNetV2 .features[14:] (the 7x7 stages and the 1x1 head) train
FINETUNE_EPOCHS = 12  # fixed in advance: no epoch is chosen on a test fold
FLIPS = ((), (3,), (2,), (2, 3))  # none, horizontal, vertical, both (dims of NCHW)


def imagenet_trunk(records) -> np.ndarray:
    """(N, 4, 96, 14, 14) float16 outputs of the frozen ImageNet blocks 0-13 for the image
    and its three flips (cached): what stays fixed while the last blocks train."""
    import hashlib

    import torch

    from medlens.io import load_image
    from medlens.models import load_encoder
    from medlens.models.lite import _build_mobilenet_v2

    key = hashlib.sha256("\n".join(str(r.path) for r in records).encode()).hexdigest()[:16]
    path = FEATURES / f"imagenet_mnv2_trunk{FINETUNE_FROM}_{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    enc = load_encoder("lite")
    trunk = _build_mobilenet_v2()[0][:FINETUNE_FROM].eval()
    torch.set_grad_enabled(False)
    out = np.lib.format.open_memmap(
        path.with_suffix(".tmp.npy"), "w+", np.float16, (len(records), 4, 96, 14, 14)
    )
    for i in range(0, len(records), 32):
        x = enc.preprocess([load_image(r.path).pixels for r in records[i : i + 32]]).float()
        for j, dims in enumerate(FLIPS):
            out[i : i + len(x), j] = trunk(torch.flip(x, dims) if dims else x).numpy()
        print(f"  trunk {i + len(x)}/{len(records)}", file=sys.stderr, flush=True)
    out.flush()
    del out
    path.with_suffix(".tmp.npy").rename(path)
    return np.load(path, mmap_mode="r")


def finetune_fold(trunk, ctx, y, tr, te, n_classes: int, seed: int = 0) -> np.ndarray:
    """Train MobileNetV2 blocks 14-18 (ImageNet start) + a linear head on the training
    folds, class-balanced loss, a random flip per image per epoch; ``ctx`` (or None) is
    concatenated to the pooled features before the head (end-to-end concat fusion).
    Returns the test rows' log-probabilities (mean over the four flips)."""
    import torch
    from torch import nn

    from medlens.models.lite import _build_mobilenet_v2

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.set_grad_enabled(True)
    tail = nn.Sequential(
        _build_mobilenet_v2()[0][FINETUNE_FROM:], nn.AdaptiveAvgPool2d(1), nn.Flatten(1)
    )
    n_ctx = 0 if ctx is None else ctx.shape[1]
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280 + n_ctx, n_classes))
    opt = torch.optim.AdamW(
        [{"params": tail.parameters(), "lr": 3e-4}, {"params": head.parameters(), "lr": 1e-3}],
        weight_decay=1e-4,
    )
    counts = np.bincount(y[tr], minlength=n_classes)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(len(tr) / (n_classes * counts)).float())
    tr_idx = np.flatnonzero(tr)
    c = None if ctx is None else torch.tensor(ctx, dtype=torch.float32)

    def forward(idx, flip):
        x = torch.from_numpy(np.asarray(trunk[idx, flip], dtype=np.float32))
        f = tail(x)
        return head(f if c is None else torch.cat([f, c[idx]], 1))

    for _ in range(FINETUNE_EPOCHS):
        tail.train(), head.train()
        for b in np.array_split(rng.permutation(tr_idx), max(1, len(tr_idx) // 32)):
            b = np.sort(b)
            loss = loss_fn(forward(b, int(rng.integers(4))), torch.from_numpy(y[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    tail.eval(), head.eval()
    te_idx = np.flatnonzero(te)
    with torch.no_grad():
        lp = [torch.log_softmax(forward(te_idx, f), 1).numpy() for f in range(4)]
    torch.set_grad_enabled(False)
    return np.mean(lp, axis=0)


def part_a2(n_boot: int) -> dict:
    """PAD-UFES-20 5-fold CV with the last MobileNetV2 blocks fine-tuned per fold: image
    only, and end-to-end concat fusion with the context (no Fitzpatrick)."""
    from medlens.analysis import fusion as F

    vocab, recs, classes, y, groups, folds, ctxs = pad_cv_data()
    no_fitz = tuple(f for f in F.FIELDS if f != "fitzpatrick")
    ctx = np.stack([F.encode(c, vocab, no_fitz) for c in ctxs])
    trunk = imagenet_trunk(recs)
    preds = {k: np.empty_like(y) for k in ("image", "concat fusion, no Fitzpatrick")}
    for k in range(5):
        tr, te = folds != k, folds == k
        t0 = time.time()
        lp_img = finetune_fold(trunk, None, y, tr, te, len(classes))
        preds["image"][te] = lp_img.argmax(1)
        preds["concat fusion, no Fitzpatrick"][te] = finetune_fold(
            trunk, ctx, y, tr, te, len(classes)
        ).argmax(1)
        print(f"fine-tune fold {k} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for name, p in preds.items():
        per_fold = [bal_acc(y[folds == k], p[folds == k]) for k in range(5)]
        rows.append(
            {
                "model": f"fine-tuned blocks {FINETUNE_FROM}+: {name}",
                "balanced_accuracy": round(bal_acc(y, p), 3),
                "ci95": boot_ci(y, p, groups, n_boot),
                "fold_mean": round(float(np.mean(per_fold)), 3),
                "fold_sd": round(float(np.std(per_fold)), 3),
            }
        )
    return {"rows": rows, "epochs": FINETUNE_EPOCHS, "from_block": FINETUNE_FROM}


# ------------------------------------------------------------ part B: shipped model
def part_b() -> dict:
    from medlens.analysis import fusion as F
    from medlens.analysis.context import vocabulary
    from medlens.config import get_settings
    from medlens.evaluation import metrics as M
    from medlens.knowledge import load_domain
    from medlens.models import load_encoder
    from medlens.models.card import card_for
    from medlens.training.fusion import collect

    settings = get_settings()
    enc = load_encoder("lite")
    card = card_for(enc, settings.cards_dir)
    pack = load_domain("dermatology")
    vocab = vocabulary(pack)
    head = F.find_head(enc.fingerprint, pack.id, settings.cards_dir)
    if head is None:
        raise SystemExit("no fusion head for the lite model: run `medlens train fusion --write`")
    data = collect(enc, card.calibration, pack, "test", prompt_cache=settings.cache_dir)
    ids = pack.finding_ids
    shift = np.stack([head.shift_for(ids, c, vocab) for c in data.contexts])
    thresholds = card.calibration.thresholds_for(pack.id)

    def softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    p_img_all = softmax(data.logits)
    p_fus_all = softmax(data.logits + shift)
    views = [r.meta.get("view") for r in data.records]
    sets = [("ham10000", None), ("pad_ufes_20", None), ("derm7pt", "derm"), ("derm7pt", "clinic")]
    out = []
    for ds, view in sets:
        sel = (data.dataset == ds) & (np.array([v == view for v in views]) if view else True)
        cand = data.candidates[ds]
        y = np.array([cand.index(v) for v in data.y[sel]])
        row = {
            "dataset": ds + (f" ({view})" if view else ""),
            "n": int(sel.sum()),
            "context": sorted(
                {
                    g.split(".")[0]
                    for c in np.array(data.contexts, dtype=object)[sel]
                    for g in c.given()
                }
            ),
        }
        for name, z in (("image", data.logits[sel]), ("fusion", data.logits[sel] + shift[sel])):
            pc = softmax(z[:, cand])
            pa = softmax(z)
            row[f"{name}_bacc"] = round(bal_acc(y, pc.argmax(1)), 3)
            row[f"{name}_ece"] = round(float(M.ece(pc, y)), 3)
            mel = ids.index("melanoma")
            if mel in cand:
                row[f"{name}_mel_auroc"] = round(
                    float(M.binary_auroc(data.y[sel] == mel, pa[:, mel])), 3
                )
        # sensitivity at the stored thresholds (full differential, as triage reads it)
        for f in ("melanoma", *CARCINOMAS):
            k = ids.index(f)
            pos = data.y[sel] == k
            if pos.sum() < 5 or f not in thresholds:
                continue
            t = thresholds[f]
            img_hit = p_img_all[sel][:, k] >= t
            fus_hit = p_fus_all[sel][:, k] >= t
            row[f"{f}_sens"] = {
                "n_pos": int(pos.sum()),
                "threshold": round(t, 4),
                "image": round(float(img_hit[pos].mean()), 3),
                "fusion_raw": round(float(fus_hit[pos].mean()), 3),
                "fusion_floored": round(float((fus_hit | img_hit)[pos].mean()), 3),
                "spec_image": round(float(1 - img_hit[~pos].mean()), 3),
                "spec_fusion_floored": round(float(1 - (fus_hit | img_hit)[~pos].mean()), 3),
            }
        out.append(row)
    # part C: Derm7pt pairs (same case, two views): mean of the calibrated logits
    d7 = data.dataset == "derm7pt"
    cases: dict[str, dict[str, int]] = {}
    for i in np.flatnonzero(d7):
        case, view = data.records[i].id.split("/")
        cases.setdefault(case, {})[view] = i
    pairs = [(v["derm"], v["clinic"]) for v in cases.values() if len(v) == 2]
    cand = data.candidates["derm7pt"]
    di, ci = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    y = np.array([cand.index(v) for v in data.y[di]])
    a = head.dermoscopy_weight
    paired = {}
    for name, extra in (("image", 0.0), ("fusion", 1.0)):
        zd, zc = data.logits[di], data.logits[ci]
        views = {
            "dermoscopic": zd,
            "clinical": zc,
            "pair, equal mean": (zd + zc) / 2,
            "pair, head weight": (1 - a) * zc + a * zd,
        }
        for view, z in views.items():
            z = z + extra * shift[di]  # the same case: the same context
            paired[f"{name} {view}"] = round(bal_acc(y, softmax(z[:, cand]).argmax(1)), 3)
    return {
        "head": {"fields": list(head.fields), **head.info},
        "rows": out,
        "pairs": {"n": len(pairs), "dermoscopy_weight": a, **paired},
    }


def markdown(a: dict | None, b: dict | None, a2: dict | None, cmds: dict[str, str]) -> str:
    lines = ["# Clinical context fusion (issue 15)", "", "Made by:", ""]
    lines += [f"- part {k}: `{v}`" for k, v in sorted(cmds.items())]
    lines.append("")
    if a is not None:
        lines += [
            "## PAD-UFES-20, patient-grouped 5-fold cross-validation",
            "",
            f"{a['n']} images, {a['patients']} patients; classes {', '.join(a['classes'])}. "
            "Image features: ImageNet MobileNetV2 (never trained on PAD-UFES-20); every model "
            "per fold trained without that fold's patients. Balanced accuracy of the pooled "
            "out-of-fold predictions (95 % CI, patient bootstrap) and the mean ± sd over folds.",
            "",
            "| model | balanced accuracy | 95 % CI | folds mean ± sd |",
            "|---|---|---|---|",
        ]
        for r in a["rows"]:
            lines.append(
                f"| {r['model']} | {r['balanced_accuracy']:.3f} | "
                f"{r['ci95'][0]:.3f}–{r['ci95'][1]:.3f} | "
                f"{r['fold_mean']:.3f} ± {r['fold_sd']:.3f} |"
            )
        lines += [
            "",
            "### Subgroups (balanced accuracy; fusion without Fitzpatrick)",
            "",
            "| by | group | n | image | fusion (stacked) | fusion (joint) |",
            "|---|---|---|---|---|---|",
        ]
        for r in a["subgroups"]:
            lines.append(
                f"| {r['by']} | {r['group']} | {r['n']} | {r['image']:.3f} | "
                f"{r['fusion']:.3f} | {r['fusion_joint']:.3f} |"
            )
        lines.append("")
    if a2 is not None:
        lines += [
            f"### Attempt: the last MobileNetV2 blocks ({a2['from_block']}-18) fine-tuned per fold",
            "",
            "The same folds; ImageNet start, blocks 0-13 frozen (their outputs cached for the "
            f"image and its three flips), {a2['epochs']} epochs fixed in advance, AdamW, "
            "class-balanced loss, a random flip per image per epoch, test = mean over the "
            "four flips. *Concat fusion*: the context encoding (no Fitzpatrick) joined to the "
            "pooled features before the linear head, trained end to end.",
            "",
            "| model | balanced accuracy | 95 % CI | folds mean ± sd |",
            "|---|---|---|---|",
        ]
        for r in a2["rows"]:
            lines.append(
                f"| {r['model']} | {r['balanced_accuracy']:.3f} | "
                f"{r['ci95'][0]:.3f}–{r['ci95'][1]:.3f} | "
                f"{r['fold_mean']:.3f} ± {r['fold_sd']:.3f} |"
            )
        lines.append("")
    if b is not None:
        h = b["head"]
        lines += [
            "## The shipped model and fusion head on test splits",
            "",
            f"Head fields: {', '.join(h['fields'])}; fitted on validation splits "
            f"{h.get('fitted_on')}, l2 {h.get('l2')} (grouped CV on validation). "
            "Balanced accuracy and ECE over each dataset's findings; melanoma AUROC over the "
            "full differential.",
            "",
            "| test set | n | context fields | BA image | BA fusion | mel AUROC image "
            "| mel AUROC fusion | ECE image | ECE fusion |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in b["rows"]:
            lines.append(
                f"| {r['dataset']} | {r['n']} | {', '.join(r['context'])} | "
                f"{r['image_bacc']:.3f} | "
                f"{r['fusion_bacc']:.3f} | {r.get('image_mel_auroc', '–')} | "
                f"{r.get('fusion_mel_auroc', '–')} | {r['image_ece']:.3f} | {r['fusion_ece']:.3f} |"
            )
        lines += [
            "",
            "### Sensitivity at the stored triage thresholds",
            "",
            "Fused = raw fused probabilities; floored = the pipeline's rule (context may "
            "raise a triage, never lower it).",
            "",
            "| test set | finding | positives | threshold | sens. image | sens. fused | "
            "sens. floored | spec. image | spec. floored |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in b["rows"]:
            for f in ("melanoma", *CARCINOMAS):
                s = r.get(f"{f}_sens")
                if s:
                    lines.append(
                        f"| {r['dataset']} | {f} | {s['n_pos']} | {s['threshold']} | "
                        f"{s['image']:.3f} | {s['fusion_raw']:.3f} | {s['fusion_floored']:.3f} | "
                        f"{s['spec_image']:.3f} | {s['spec_fusion_floored']:.3f} |"
                    )
        p = b["pairs"]
        lines += [
            "",
            f"### Derm7pt test, two views of one lesion ({p['n']} cases)",
            "",
            "Balanced accuracy over Derm7pt's findings. The pair is scored on "
            "(1 - a)·clinical + a·dermoscopic calibrated logits; a = "
            f"{p['dermoscopy_weight']:.1f} was fitted on Derm7pt *valid* pairs by "
            "`medlens train fusion` (the equal mean, a = 0.5, is shown for comparison).",
            "",
            "| | dermoscopic | clinical | pair, equal mean | pair, fitted weight |",
            "|---|---|---|---|---|",
            *(
                f"| {label} | {p[k + ' dermoscopic']:.3f} | {p[k + ' clinical']:.3f} | "
                f"{p[k + ' pair, equal mean']:.3f} | {p[k + ' pair, head weight']:.3f} |"
                for label, k in (("image", "image"), ("with context", "fusion"))
            ),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "fusion.md")
    ap.add_argument("--json", type=Path, default=RESULTS / "fusion.json")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument(
        "--part",
        choices=["a", "a2", "b", "all", "none"],
        default="all",
        help="run one part (none: only re-render); the others are kept from --json",
    )
    args = ap.parse_args()
    done = json.loads(args.json.read_text()) if args.json.is_file() else {}
    run = {"a": "cv", "a2": "finetune", "b": "test"}
    parts = {
        "cv": lambda: part_a(args.boot),
        "finetune": lambda: part_a2(args.boot),
        "test": part_b,
    }
    out = {k: done.get(k) for k in parts}
    for name, key in run.items():
        if args.part in (name, "all"):
            out[key] = parts[key]()
    cmds = dict(done.get("cmds", {}))
    for name in run if args.part == "all" else [args.part] if args.part in run else []:
        cmds[name] = f"MEDLENS_DATA=../shared/data python benchmarks/fusion.py --part {name}"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cmds": cmds, **out}, indent=2) + "\n")
    text = markdown(out["cv"], out["test"], out["finetune"], cmds)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
