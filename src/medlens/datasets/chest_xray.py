"""Chest X-ray datasets: COVID-19 image data collection, IU X-ray reports, NIH
ChestX-ray14 and the mixed ``cxr-samples`` I/O folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medlens.datasets import _common as C
from medlens.datasets.manifest import Manifest, Record
from medlens.datasets.splits import check_fractions, grouped_split
from medlens.errors import ConfigError, DatasetError

# --------------------------------------------------------------------------- COVID-19


def _unlabelled_markers(domain: str, vocab: str) -> set[str]:
    """Labels meaning "no diagnosis", as the knowledge pack declares them for ``vocab``
    (one source of truth: the pack that maps labels also says which carry none)."""
    from medlens.knowledge import load_domain

    return {x.strip().casefold() for x in load_domain(domain).domain.unlabelled.get(vocab, ())}


def load_covid_chestxray(
    root: Path | None = None,
    *,
    seed: int | None = None,
    fractions: Mapping[str, float] | None = None,
) -> Manifest:
    """COVID-19 image data collection (Cohen et al.), chest X-rays: ``metadata.csv`` with
    images in ``images/`` (column ``image``).

    Labels: ``finding`` split on ", " ("COVID-19, ARDS" -> two labels; vocab
    ``covid_chestxray``); the values the chest_xray pack declares unlabelled for this
    vocabulary ("todo", "Unknown") give labels (). text = ``clinical_notes`` (None when
    empty). group = ``patientid``; split: patients ordered by sha256("<seed>:<patientid>")
    and filled 70/15/15 by image count (default seed 0), so no patient crosses splits.
    meta: view, sex, age, license and the other fields in ``datasets.yaml`` (verbatim
    strings, None when empty).
    """
    name, spec = "covid_chestxray", C.spec("covid_chestxray")
    root = C.resolve_root(name, root)
    seed = C.default_seed() if seed is None else int(seed)
    fr = check_fractions(fractions or C.default_fractions())
    meta_path = root / "metadata.csv"
    rows = C.read_rows(meta_path, ["patientid", "finding", "image", "clinical_notes"])
    images = C.index_images([root / "images", root])
    none = _unlabelled_markers(spec["domain"], spec["vocab"])
    kept = C.rows_with_images(name, rows, images, "image")
    splits = grouped_split([r["patientid"].strip() for r in kept], fr, seed)
    records = []
    for r, split in zip(kept, splits, strict=True):
        found = [f.strip() for f in r["finding"].split(spec["finding_separator"])]
        labels = tuple(f for f in found if f and f.casefold() not in none)
        records.append(
            Record(
                id=r["image"].strip(),
                labels=labels,
                split=split,
                group=r["patientid"].strip(),
                text=C.blank(r["clinical_notes"]),
                path=images[r["image"].strip()],
                meta={k: C.blank(r.get(k)) for k in spec["meta"]},
            )
        )
    return C.manifest(name, spec, records, root, [meta_path], {"seed": seed, "fractions": fr})


# --------------------------------------------------------------------------- IU X-ray

_CXR_UID = re.compile(r"^CXR(\d+)_")


def _terms(cell: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in cell.split(";") if t.strip())


def load_iu_xray(root: Path | None = None) -> Manifest:
    """Indiana University chest X-ray reports (Open-i): ``reports.csv`` (uid, images,
    indication, comparison, findings, impression, mesh_major, mesh_minor) and the R2Gen
    split ``r2gen_annotation.json``.

    One record per report (3,955 in the sample). text = findings + impression. Labels are
    (): MeSH terms are free-form ("Calcified Granuloma/lung/upper lobe/right"), not a label
    vocabulary, so they stay in meta["mesh_major"] / meta["mesh_minor"] (split on ";").
    Split: an R2Gen entry's id is a study's image-name prefix ("CXR2384_IM-0942" for
    image "CXR2384_IM-0942-1001"), matched against the report's image list (then, if
    needed, its "CXR<uid>_" number); R2Gen keeps 2,955 studies (2069/296/590), the other
    reports (no findings or no images) get split None. group = uid: Open-i publishes no
    patient ids. path is None unless an ``images/`` or ``NLMCXR_png/`` folder of the
    Open-i PNGs is present, then it is the report's first listed image found there.
    """
    name, spec = "iu_xray", C.spec("iu_xray")
    root = C.resolve_root(name, root)
    reports = root / "reports.csv"
    rows = C.read_rows(reports, ["uid", "images", "findings", "impression"])
    index_files = [reports]
    split_of_prefix: dict[str, str] = {}
    split_of_uid: dict[str, str] = {}
    ann_path = root / "r2gen_annotation.json"
    if ann_path.is_file():
        index_files.append(ann_path)
        ann = json.loads(ann_path.read_text("utf-8"))
        for split, entries in ann.items():
            split_name = {"val": "val", "valid": "val", "train": "train", "test": "test"}.get(split)
            if split_name is None:
                raise DatasetError(f"{ann_path.name}: unknown split {split!r}")
            for e in entries:
                split_of_prefix[e["id"]] = split_name
                if m := _CXR_UID.match(e["id"]):
                    split_of_uid.setdefault(m.group(1), split_name)
    images = C.index_images([root / d for d in spec["image_dirs"]], recursive=True)
    records = []
    for r in rows:
        uid = r["uid"].strip()
        ims = _terms(r["images"])
        prefixes = [i.rsplit("-", 1)[0] for i in ims]
        split = next(
            (split_of_prefix[p] for p in prefixes if p in split_of_prefix),
            split_of_uid.get(uid),
        )
        parts = [C.blank(r[k]) for k in ("findings", "impression")]
        text = " ".join(p for p in parts if p) or None
        records.append(
            Record(
                id=f"CXR{uid}",
                split=split,
                group=uid,
                text=text,
                path=next((images[i] for i in ims if i in images), None),
                meta={
                    "indication": C.blank(r.get("indication")),
                    "comparison": C.blank(r.get("comparison")),
                    "findings": parts[0],
                    "impression": parts[1],
                    "mesh_major": _terms(r.get("mesh_major", "")),
                    "mesh_minor": _terms(r.get("mesh_minor", "")),
                    "images": ims,
                },
            )
        )
    return C.manifest(name, spec, records, root, index_files, {})


# --------------------------------------------------------------------------- NIH CXR14


def load_nih_cxr14(
    root: Path | None = None,
    *,
    seed: int | None = None,
    val_fraction: float | None = None,
    fractions: Mapping[str, float] | None = None,
) -> Manifest:
    """NIH ChestX-ray14: ``Data_Entry_2017_v2020.csv`` or ``Data_Entry_2017.csv``
    ("Image Index", "Finding Labels" "A|B", "Patient ID", "Patient Age", "Patient
    Gender", "View Position"); images in ``images/``, ``images_*/`` or
    ``images_*/images/`` (rows whose PNG is absent, e.g. a partial download, are skipped
    with a warning).

    Labels: "Finding Labels" split on "|" ("No Finding" kept as a label; vocab
    ``nih_cxr14``). group = Patient ID. Split: the official ``test_list.txt`` ->
    "test"; ``train_val_list.txt`` -> "train", with ``val_fraction`` (default 0.1) of its
    patients held out as "val" (ordered by sha256("<seed>:<patient>")). Without the list
    files: patient-grouped ``fractions`` (default 70/15/15). Both are patient-disjoint.
    """
    name, spec = "nih_cxr14", C.spec("nih_cxr14")
    root = C.resolve_root(name, root)
    seed = C.default_seed() if seed is None else int(seed)
    entry = next((root / e for e in spec["entries"] if (root / e).is_file()), None)
    if entry is None:
        raise DatasetError(f"{name}: no {' / '.join(spec['entries'])} in {root}")
    cols = ["Image Index", "Finding Labels", "Patient ID"]
    rows = C.read_rows(entry, cols)
    dirs = [root / "images"]
    for d in sorted(root.glob("images_*")):
        dirs += [d, d / "images"]
    images = C.index_images(dirs)
    kept = C.rows_with_images(name, rows, images, "Image Index")
    index_files = [entry]
    official: dict[str, str] = {}
    for fname, split in spec["official_split"].items():
        if (root / fname).is_file():
            index_files.append(root / fname)
            for line in (root / fname).read_text("utf-8").split():
                official[line.strip()] = split
    patients = [r["Patient ID"].strip() for r in kept]
    options: dict[str, Any] = {"seed": seed}
    if official:
        vf = float(spec["val_fraction"] if val_fraction is None else val_fraction)
        if not 0 <= vf < 1:
            raise ConfigError(f"{name}: val_fraction must be in [0, 1), got {vf}")
        options["val_fraction"] = vf
        tv = [
            p
            for r, p in zip(kept, patients, strict=True)
            if official.get(r["Image Index"].strip()) == "train"
        ]
        carve = dict(zip(tv, grouped_split(tv, {"train": 1 - vf, "val": vf}, seed), strict=True))
        splits = [
            carve[p]
            if official.get(r["Image Index"].strip()) == "train"
            else official.get(r["Image Index"].strip())
            for r, p in zip(kept, patients, strict=True)
        ]
    else:
        fr = check_fractions(fractions or C.default_fractions())
        options["fractions"] = fr
        splits = grouped_split(patients, fr, seed)
    records = [
        Record(
            id=r["Image Index"].strip(),
            labels=tuple(x.strip() for x in r["Finding Labels"].split("|") if x.strip()),
            split=split,
            group=p,
            path=images[r["Image Index"].strip()],
            meta={
                "age": C.blank(r.get("Patient Age")),
                "sex": C.blank(r.get("Patient Gender")),
                "view": C.blank(r.get("View Position")),
                "follow_up": C.blank(r.get("Follow-up #")),
            },
        )
        for r, p, split in zip(kept, patients, splits, strict=True)
    ]
    return C.manifest(name, spec, records, root, index_files, options)


# --------------------------------------------------------------------------- cxr-samples


def load_cxr_samples(root: Path | None = None) -> Manifest:
    """The ``cxr-samples`` I/O folder: every image file in it, labelled by file name from
    the sample README (``datasets.yaml``): NIH ``00000001_000.png`` Cardiomegaly and
    ``00027426_000.png`` No Finding (vocab ``nih_cxr14``), TBX11K ``h0001.png`` healthy and
    ``tb0005.png`` / ``tb0007.png`` tb (vocab ``tbx11k``); the PadChest JPEG and the DICOMs
    are unlabelled. The files come from datasets with different vocabularies, so each
    record keeps its own in meta["vocab"]: map labels with
    ``pack.findings_for(manifest.vocab_of(record), record.labels)``; ``Manifest.vocab`` is "mixed".
    No split (split None): the folder is for I/O and domain checks, not training.
    """
    name, spec = "cxr_samples", C.spec("cxr_samples")
    root = C.resolve_root(name, root)
    files: dict[str, dict[str, Any]] = spec["files"]
    paths = sorted({p for p in C.index_images([root]).values()})
    records = []
    for p in paths:
        info = files.get(p.name, {})
        default_source = "DICOM" if p.suffix.lower() == ".dcm" else None
        meta: dict[str, Any] = {"source": info.get("source", default_source)}
        if info.get("vocab"):
            meta["vocab"] = info["vocab"]
        records.append(Record(id=p.name, labels=tuple(info.get("labels", ())), path=p, meta=meta))
    listing = [[p.name, p.stat().st_size] for p in paths]
    return C.manifest(name, spec, records, root, [], {"files": listing, "labels": files})
