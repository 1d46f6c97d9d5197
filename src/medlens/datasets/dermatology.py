"""Skin datasets: ISIC 2018 Task 3, HAM10000, PAD-UFES-20 and DermNet.

Labels stay in each dataset's vocabulary (``ham10000`` dx codes, ``pad_ufes_20``
diagnostic codes, ``dermnet`` condition names); the dermatology pack maps them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medlens.datasets import _common as C
from medlens.datasets.manifest import Manifest, Record, sha256_file
from medlens.datasets.splits import check_fractions, grouped_folds, grouped_split
from medlens.errors import ConfigError, DatasetError

# --------------------------------------------------------------------------- ISIC 2018


def _find_ground_truth(root: Path, pattern: str, part: str) -> Path | None:
    name = pattern.format(part=part)
    for cand in (root / name, root / Path(name).stem / name):
        if cand.is_file():
            return cand
    return None


def load_isic2018(root: Path | None = None) -> Manifest:
    """ISIC 2018 Task 3 (7 classes, vocab ``ham10000`` lower-case dx codes).

    Official layout: for each part present (Training -> "train", Validation -> "val",
    Test -> "test"), ``ISIC2018_Task3_<Part>_GroundTruth.csv`` (one-hot columns image,
    MEL, NV, BCC, AKIEC, BKL, DF, VASC; also found inside a folder of the same stem, as the
    official zips extract) with images in ``ISIC2018_Task3_<Part>_Input/`` or ``images/``.
    ``ISIC2018_Task3_Training_LesionGroupings.csv`` (image, lesion_id), when present, sets
    ``group``; otherwise no lesion ids are published and group is None.

    Without official CSVs, ``labels.csv`` (image_id, dx) is read as the test set: the only
    copy with that layout is the sample folder, which holds the official test set.
    """
    name, spec = "isic2018", C.spec("isic2018")
    root = C.resolve_root(name, root)
    one_hot: dict[str, str] = spec["one_hot"]
    groupings: dict[str, str] = {}
    index_files: list[Path] = []
    grp_path = root / spec["lesion_groupings"]
    if grp_path.is_file():
        index_files.append(grp_path)
        groupings = {
            r["image"].strip(): r["lesion_id"].strip()
            for r in C.read_rows(grp_path, ["image", "lesion_id"])
        }
    rows: list[tuple[str, str, str]] = []  # (image id, dx, split)
    images: dict[str, Path] = {}
    official = False
    for part, split in spec["parts"].items():
        gt = _find_ground_truth(root, spec["ground_truth"], part)
        if gt is None:
            continue
        official = True
        index_files.append(gt)
        for r in C.read_rows(gt, ["image", *one_hot]):
            hot = [code for col, code in one_hot.items() if float(r[col] or 0) >= 0.5]
            if len(hot) != 1:
                raise DatasetError(f"{gt.name}: row {r['image']} is not one-hot: {hot}")
            rows.append((r["image"].strip(), hot[0], split))
        images.update(C.index_images([root / spec["input_dir"].format(part=part)], recursive=True))
    if not official:
        labels_csv = root / "labels.csv"
        if not labels_csv.is_file():
            raise DatasetError(
                f"{name}: no ISIC2018_Task3_*_GroundTruth.csv or labels.csv in {root}"
            )
        index_files.append(labels_csv)
        rows = [
            (r["image_id"].strip(), r["dx"].strip().lower(), "test")
            for r in C.read_rows(labels_csv, ["image_id", "dx"])
        ]
    images.update({k: v for k, v in C.index_images([root / "images"]).items() if k not in images})
    records, missing = [], 0
    for image_id, dx, split in rows:
        path = images.get(image_id)
        if path is None:
            missing += 1
            continue
        records.append(
            Record(id=image_id, labels=(dx,), split=split, group=groupings.get(image_id), path=path)
        )
    C.warn_missing(name, missing)
    return C.manifest(name, spec, records, root, index_files, {})


# --------------------------------------------------------------------------- HAM10000


def load_ham10000(
    root: Path | None = None,
    *,
    seed: int | None = None,
    fractions: Mapping[str, float] | None = None,
) -> Manifest:
    """HAM10000 full release: ``HAM10000_metadata.csv`` (lesion_id, image_id, dx,
    dx_type, age, sex, localization; the Dataverse ``.tab`` copy works too) with images
    in ``HAM10000_images_part_1/``, ``HAM10000_images_part_2/`` or ``images/``.

    HAM10000 has no official split. A ``split`` column (the sample copy's, grouped by
    lesion and consistent with DermaMNIST, so DermaMNIST's test lesions are never trained
    on) is used as given; otherwise the split is grouped by ``lesion_id`` (several images
    of one lesion never cross splits): lesions are ordered by sha256("<seed>:<lesion_id>")
    and filled 70/15/15 (train/val/test) by image count; default seed 0
    (``datasets.yaml``). meta: dx_type, age, sex, localization (+ dermamnist_split).
    """
    name, spec = "ham10000", C.spec("ham10000")
    root = C.resolve_root(name, root)
    meta_path = next((root / m for m in spec["metadata"] if (root / m).is_file()), None)
    if meta_path is None:
        raise DatasetError(f"{name}: no {' / '.join(spec['metadata'])} in {root}")
    seed = C.default_seed() if seed is None else int(seed)
    fr = check_fractions(fractions or C.default_fractions())
    rows = C.read_rows(meta_path, ["lesion_id", "image_id", "dx"])
    images = C.index_images([root / d for d in spec["image_dirs"]])
    kept = C.rows_with_images(name, rows, images, "image_id")
    given = [(r.get("split") or "").strip() for r in kept]
    if kept and all(s in ("train", "val", "test") for s in given):
        splits, options = given, {"split": "metadata"}
    else:
        splits = grouped_split([r["lesion_id"].strip() for r in kept], fr, seed)
        options = {"seed": seed, "fractions": fr}
    meta_cols = ("dx_type", "age", "sex", "localization", "dermamnist_split")
    records = [
        Record(
            id=r["image_id"].strip(),
            labels=(r["dx"].strip().lower(),),
            split=split,
            group=r["lesion_id"].strip(),
            path=images[r["image_id"].strip()],
            meta={k: C.blank(r.get(k)) for k in meta_cols},
        )
        for r, split in zip(kept, splits, strict=True)
    ]
    return C.manifest(name, spec, records, root, [meta_path], options)


# --------------------------------------------------------------------------- PAD-UFES-20

# Phrases for each symptom answer; UNK or empty answers say nothing.
_SYMPTOM_PHRASES: dict[str, tuple[str, str]] = {
    # field: (when "True", when "False")
    "itch": ("itches", "no itching"),
    "grew": ("has grown", "has not grown"),
    "hurt": ("hurts", "no pain"),
    "changed": ("has changed", "has not changed"),
    "bleed": ("bleeds", "no bleeding"),
    "elevation": ("is raised", "is flat"),
}


def render_pad_symptoms(row: Mapping[str, Any]) -> str:
    """One sentence from a PAD-UFES-20 metadata row: age, region, then the symptoms the
    patient reported and those they denied, e.g. "62-year-old, lesion on the forearm;
    itches, has grown, bleeds; no pain". Gives text models the history a clinician would
    hear, in the words a patient-facing description uses. Empty string if nothing is known.
    """
    head: list[str] = []
    age = str(row.get("age") or "").strip()
    if age.replace(".", "", 1).isdigit():
        head.append(f"{round(float(age))}-year-old")
    else:
        age = ""
    region = str(row.get("region") or "").strip()
    if region:
        head.append(f"lesion on the {region.lower().replace('_', ' ')}")
    if head and not age:
        head[0] = head[0][0].upper() + head[0][1:]
    yes = [p for k, (p, _) in _SYMPTOM_PHRASES.items() if str(row.get(k, "")).strip() == "True"]
    no = [n for k, (_, n) in _SYMPTOM_PHRASES.items() if str(row.get(k, "")).strip() == "False"]
    parts = [", ".join(x) for x in (head, yes, no) if x]
    return "; ".join(parts)


def load_pad_ufes_20(
    root: Path | None = None,
    *,
    seed: int | None = None,
    n_folds: int | None = None,
    split_folds: Mapping[str, list[int]] | None = None,
) -> Manifest:
    """PAD-UFES-20 smartphone lesion photos (``metadata.csv``; crops in ``images/``).

    Records are the rows with a non-empty ``image`` column (1,650 of 2,298 in the sample
    copy; the other 648 rows have no lesion crop and are skipped). Labels: ``diagnostic``
    (BCC, ACK, NEV, SEK, SCC, MEL; vocab ``pad_ufes_20``). group = ``patient_id``: one
    patient can have several lesions and images.

    Splits: patients get a fold 0..4 (``meta["fold"]``; ordered by
    sha256("<seed>:<patient_id>"), folds of near-equal image counts, default seed 0) for
    patient-grouped cross-validation; the default split is folds 0-2 train, 3 val, 4 test
    (about 60/20/20), so no patient crosses splits. text = ``render_pad_symptoms``; meta
    keeps age, region, Fitzpatrick type, the six symptom answers and the other clinical
    fields listed in ``datasets.yaml``.
    """
    name, spec = "pad_ufes_20", C.spec("pad_ufes_20")
    root = C.resolve_root(name, root)
    seed = C.default_seed() if seed is None else int(seed)
    n_folds = int(n_folds or spec["n_folds"])
    pairs = [(int(f), s) for s, fs in (split_folds or spec["split_folds"]).items() for f in fs]
    fold_split = dict(pairs)
    if sorted(f for f, _ in pairs) != list(range(n_folds)) or not set(fold_split.values()) <= {
        "train",
        "val",
        "test",
    }:
        raise ConfigError(f"{name}: split_folds must assign each of folds 0..{n_folds - 1} once")
    meta_path = root / "metadata.csv"
    rows = C.read_rows(meta_path, ["patient_id", "diagnostic", "image", *spec["symptoms"]])
    images = C.index_images([root / "images", root])
    kept = C.rows_with_images(name, rows, images, "image")
    folds = grouped_folds([r["patient_id"].strip() for r in kept], n_folds, seed)
    records = []
    for r, fold in zip(kept, folds, strict=True):
        meta: dict[str, Any] = {k: C.blank(r.get(k)) for k in spec["meta"]}
        meta["fold"] = fold
        records.append(
            Record(
                id=Path(r["image"].strip()).stem,
                labels=(r["diagnostic"].strip(),),
                split=fold_split[fold],
                group=r["patient_id"].strip(),
                text=render_pad_symptoms(r) or None,
                path=images[r["image"].strip()],
                meta=meta,
            )
        )
    options = {"seed": seed, "n_folds": n_folds, "fold_split": sorted(fold_split.items())}
    return C.manifest(name, spec, records, root, [meta_path], options)


# --------------------------------------------------------------------------- DermNet


def load_dermnet(
    root: Path | None = None,
    *,
    seed: int | None = None,
    fractions: Mapping[str, float] | None = None,
) -> Manifest:
    """DermNet NZ clinical photographs: ``labels.csv`` (image, condition), ``images/``.

    One record per CSV row (3,118 in the sample; 136 files are listed under two
    conditions, so record ids are "<condition>/<image>"). group = sha256 of the image
    bytes, so the same picture (listed twice, or saved under two names) never lands in two
    splits; near-duplicates (resized, re-encoded) are not caught. Split: content hashes
    ordered by sha256("<seed>:<hash>") and filled 70/15/15 by record count (default seed
    0). The version covers the content hashes too. Nothing is cached to disk.
    """
    name, spec = "dermnet", C.spec("dermnet")
    root = C.resolve_root(name, root)
    seed = C.default_seed() if seed is None else int(seed)
    fr = check_fractions(fractions or C.default_fractions())
    labels_csv = root / "labels.csv"
    rows = C.read_rows(labels_csv, ["image", "condition"])
    images = C.index_images([root / "images", root])
    digests: dict[Path, str] = {}
    kept, missing = [], 0
    for r in rows:
        path = images.get(r["image"].strip())
        if path is None:
            missing += 1
            continue
        if path not in digests:
            digests[path] = sha256_file(path)
        kept.append((r, path))
    C.warn_missing(name, missing)
    groups = [digests[p] for _, p in kept]
    splits = grouped_split(groups, fr, seed)
    records = [
        Record(
            id=f"{r['condition'].strip()}/{r['image'].strip()}",
            labels=(r["condition"].strip(),),
            split=split,
            group=g,
            path=p,
        )
        for (r, p), g, split in zip(kept, groups, splits, strict=True)
    ]
    content = hashlib.sha256("".join(sorted(digests.values())).encode()).hexdigest()[:16]
    return C.manifest(
        name, spec, records, root, [labels_csv], {"seed": seed, "fractions": fr, "content": content}
    )
