"""Datasets with no dedicated loader: a folder of images, or any CSV manifest.

These are how a user brings their own data (a DermNet download sorted into class
folders, a clinic's export with a CSV index) without writing a loader.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medlens.datasets import _common as C
from medlens.datasets.manifest import Manifest, Record
from medlens.errors import ConfigError, DatasetError


def _check_domain(domain: str) -> str:
    from medlens.knowledge import domains

    if domain not in domains():
        raise ConfigError(f"unknown domain {domain!r}; choose one of {', '.join(domains())}")
    return domain


def _images_under(folder: Path) -> list[Path]:
    suffixes = C.image_suffixes()
    return sorted(
        Path(dp) / f
        for dp, dns, fs in os.walk(folder)
        if not any(part.startswith(".") for part in Path(dp).relative_to(folder).parts)
        for f in fs
        if Path(f).suffix.lower() in suffixes and not f.startswith(".")
    )


def load_folder(
    path: Path | str,
    domain: str,
    *,
    vocab: str | None = None,
    name: str | None = None,
) -> Manifest:
    """A plain folder of images as a manifest.

    - Class sub-folders (DermNet style, ``<folder>/<class>/<image>``): label = sub-folder
      name, e.g. "Psoriasis". A first level named train/val/test (or training,
      validation, valid, testing) sets the split: ``<folder>/train/<class>/<image>``.
    - A flat folder (images directly inside): unlabelled records, split None.

    ``vocab`` names the label vocabulary for the knowledge pack (pass "dermnet" for a
    DermNet download); by default it is the folder's name, which the packs will not know
    until someone maps it. ids are paths relative to the folder. The version hashes the
    file list with sizes (there is no index file).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    _check_domain(domain)
    split_names: dict[str, str] = C.constants()["split_folders"]
    records: list[Record] = []
    listing: list[tuple[str, int]] = []
    for p in _images_under(root):
        rel = p.relative_to(root)
        parts = list(rel.parts[:-1])
        split = None
        if parts and parts[0].lower() in split_names:
            split = split_names[parts[0].lower()]
            parts = parts[1:]
        labels = (parts[0],) if parts else ()
        records.append(Record(id=rel.as_posix(), labels=labels, split=split, path=p))
        listing.append((rel.as_posix(), p.stat().st_size))
    if not records:
        raise DatasetError(f"{root} holds no image files ({', '.join(sorted(C.image_suffixes()))})")
    name = name or root.name
    vocab = vocab or root.name
    return Manifest(
        name=name,
        domain=domain,
        vocab=vocab,
        records=records,
        root=root,
        version=C.version("folder", [], {"files": listing, "vocab": vocab, "domain": domain}),
    )


def load_csv_manifest(
    csv_path: Path | str,
    image_col: str,
    label_col: str | None,
    *,
    domain: str,
    vocab: str,
    name: str | None = None,
    images_dir: Path | str | None = None,
    label_sep: str | None = None,
    id_col: str | None = None,
    group_col: str | None = None,
    split_col: str | None = None,
    text_col: str | None = None,
    meta_cols: Sequence[str] = (),
) -> Manifest:
    """Any CSV index (comma- or tab-separated) as a manifest.

    Images are looked up by the ``image_col`` value, with or without its extension, in
    ``images_dir`` (default: the CSV's folder and its ``images/`` sub-folder, searched
    recursively). ``label_col`` None = unlabelled; ``label_sep`` splits multi-label cells
    (e.g. "|"). Rows whose image is missing are skipped with a logged warning. Split
    values train/val/test (and their usual spellings) are normalised; others become None.
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path} is not a file")
    _check_domain(domain)
    wanted = [c for c in (image_col, label_col, id_col, group_col, split_col, text_col) if c]
    rows = C.read_rows(csv_path, [*wanted, *meta_cols])
    dirs = (
        [Path(images_dir).expanduser()]
        if images_dir is not None
        else [csv_path.parent / "images", csv_path.parent]
    )
    images = C.index_images(dirs, recursive=True)
    split_names: dict[str, str] = C.constants()["split_folders"]
    records: list[Record] = []
    missing = 0
    seen: set[str] = set()
    for r in rows:
        image = r[image_col].strip()
        path = images.get(image) or images.get(Path(image).name)
        if path is None:
            missing += 1
            continue
        rid = r[id_col].strip() if id_col else image
        if rid in seen:
            raise DatasetError(f"{csv_path.name}: id {rid!r} appears twice; pass id_col")
        seen.add(rid)
        raw = r[label_col].strip() if label_col else ""
        cells = raw.split(label_sep) if label_sep else [raw]
        labels = tuple(x.strip() for x in cells if x.strip())
        meta: dict[str, Any] = {c: C.blank(r.get(c)) for c in meta_cols}
        records.append(
            Record(
                id=rid,
                labels=labels,
                split=split_names.get(r[split_col].strip().lower()) if split_col else None,
                group=C.blank(r[group_col]) if group_col else None,
                text=C.blank(r[text_col]) if text_col else None,
                path=path,
                meta=meta,
            )
        )
    C.warn_missing(name or csv_path.stem, missing)
    options = {
        "image_col": image_col,
        "label_col": label_col,
        "label_sep": label_sep,
        "id_col": id_col,
        "group_col": group_col,
        "split_col": split_col,
        "text_col": text_col,
        "meta_cols": list(meta_cols),
        "domain": domain,
        "vocab": vocab,
    }
    return Manifest(
        name=name or csv_path.parent.name,
        domain=domain,
        vocab=vocab,
        records=records,
        root=csv_path.parent,
        version=C.version("csv", [csv_path], options),
    )
