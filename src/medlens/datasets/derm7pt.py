"""Derm7pt (7-point checklist database, Kawahara et al. 2019): 1,011 skin lesion cases,
each photographed twice, once with a clinical camera and once through a dermatoscope.

Labels stay in Derm7pt's own vocabulary (``derm7pt``: its 20 ``diagnosis`` strings);
the dermatology pack maps them to findings. The paper's 5 diagnosis groups (BCC, NEV,
MEL, MISC, SK) are kept in ``meta["group5"]`` as an evaluation vocabulary, because the
paper and later work report results on those groups, not on the 20 diagnoses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from medlens.datasets import _common as C
from medlens.datasets.manifest import Manifest, Record
from medlens.errors import ConfigError, DatasetError

View = Literal["both", "derm", "clinic"]


def _meta_folder(root: Path, meta_dir: str) -> Path:
    # Accept the release root (``<root>/meta/meta.csv``) or its meta folder itself, which
    # is what ``load_path`` passes when given the meta.csv file.
    if (root / meta_dir / "meta.csv").is_file():
        return root / meta_dir
    if (root / "meta.csv").is_file():
        return root
    raise DatasetError(f"derm7pt: no {meta_dir}/meta.csv in {root}")


def _index_rows(path: Path, n_rows: int) -> list[int]:
    rows = [int(float(r["indexes"])) for r in C.read_rows(path, ["indexes"])]
    bad = [i for i in rows if not 0 <= i < n_rows]
    if bad:
        raise DatasetError(f"derm7pt: {path.name} lists rows outside meta.csv: {bad[:5]}")
    return rows


def load_derm7pt(root: Path | None = None, *, view: View = "both") -> Manifest:
    """Derm7pt release: ``meta/meta.csv`` (one row per case; image paths relative to
    ``images/`` in columns ``clinic`` and ``derm``) and the official
    ``meta/{train,valid,test}_indexes.csv`` (0-based rows of meta.csv; valid -> "val").

    One record per image: id "<case_num>/<view>", ``meta["view"]`` "derm" or "clinic",
    group = case_num so the two views of one case always share a split. ``view`` keeps
    one view only ("derm" for the dermoscopy benchmark, "clinic" for clinical photos).
    In 9 cases the clinical image is missing and ``clinic`` repeats the dermoscopic file:
    those clinical records are dropped (a dermoscopic image evaluated as a clinical
    photo would flatter the clinical results).

    labels = (diagnosis,), except the diagnoses ``datasets.yaml`` lists as
    ``no_finding`` (no finding of the dermatology pack covers them): labels () so they
    stay out of finding-level training and metrics; their group5 still counts. meta: the
    verbatim diagnosis, group5, seven_point_score, the 7 criteria and the other
    clinical columns listed in ``datasets.yaml``.
    """
    name, spec = "derm7pt", C.spec("derm7pt")
    if view not in ("both", "derm", "clinic"):
        raise ConfigError(f"{name}: view must be both, derm or clinic, got {view!r}")
    root = C.resolve_root(name, root)
    meta_dir = _meta_folder(root, spec["meta_dir"])
    if meta_dir == root and not (root / spec["image_dir"]).is_dir():
        root = root.parent  # given the meta folder (or meta.csv): the release is one up
    meta_path = meta_dir / "meta.csv"
    rows = C.read_rows(meta_path, ["case_num", "diagnosis", "clinic", "derm"])
    split_of: dict[int, str] = {}
    index_files = [meta_path]
    for part, split in spec["splits"].items():
        path = meta_dir / f"{part}_indexes.csv"
        if not path.is_file():
            raise DatasetError(f"{name}: official split file {path} is missing")
        index_files.append(path)
        for i in _index_rows(path, len(rows)):
            if split_of.setdefault(i, split) != split:
                raise DatasetError(f"{name}: meta.csv row {i} is in two official splits")
    group5: dict[str, str] = {dx.casefold(): g for g, dxs in spec["group5"].items() for dx in dxs}
    no_finding = {x.casefold() for x in spec["no_finding"]}
    views = ("derm", "clinic") if view == "both" else (view,)
    image_dir = root / spec["image_dir"]
    records, missing = [], 0
    for i, r in enumerate(rows):
        dx = r["diagnosis"].strip()
        if dx.casefold() not in group5:
            raise DatasetError(
                f"{name}: diagnosis {dx!r} (row {i}) has no 5-group in datasets.yaml"
            )
        case = r["case_num"].strip()
        meta_common = {k: C.blank(r.get(k)) for k in spec["meta"]}
        for v in views:
            rel = r[v].strip()
            if v == "clinic" and rel == r["derm"].strip():
                continue  # clinical photo missing: the release repeats the dermoscopic file
            path = image_dir / rel
            if not rel or not path.is_file():
                missing += 1
                continue
            records.append(
                Record(
                    id=f"{case}/{v}",
                    labels=() if dx.casefold() in no_finding else (dx,),
                    split=split_of.get(i),
                    group=case,
                    path=path,
                    meta={
                        "view": v,
                        "diagnosis": dx,
                        "group5": group5[dx.casefold()],
                        **meta_common,
                    },
                )
            )
    C.warn_missing(name, missing)
    return C.manifest(name, spec, records, root, index_files, {"view": view})
