"""Dataset loaders against the real sample data: counts from the data README, grouped
splits that never leak, stable versions, pixels, layout detection and label mapping.

HAM10000 and NIH ChestX-ray14 are not in the sample data: their tests build the
documented layout in tmp_path from real images (ISIC test images, the two NIH PNGs) and
an index CSV written here with those images' real labels.
"""

from __future__ import annotations

import csv
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from medlens.datasets import (
    DATASETS,
    Manifest,
    detect_dataset,
    load_csv_manifest,
    load_dataset,
    load_folder,
    load_path,
    render_pad_symptoms,
)
from medlens.datasets._common import constants
from medlens.errors import ConfigError, DatasetError
from medlens.knowledge import load_domain

SAMPLE = {n: s["sample"] for n, s in constants()["datasets"].items()}
IN_SAMPLE = [n for n in DATASETS if n != "nih_cxr14"]


@pytest.fixture(scope="session")
def manifests(data_dir: Path) -> dict[str, Manifest]:
    """Every sample dataset loaded once (explicit roots: session scope runs before the
    per-test environment is set)."""
    return {n: load_dataset(n, data_dir / SAMPLE[n]) for n in IN_SAMPLE}


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _assert_grouped(m: Manifest) -> None:
    splits: dict[str, set[str | None]] = defaultdict(set)
    for r in m:
        assert r.group, f"{m.name}:{r.id} has no group"
        splits[r.group].add(r.split)
    crossing = {g: s for g, s in splits.items() if len(s) > 1}
    assert not crossing, f"{m.name}: groups in several splits: {list(crossing.items())[:5]}"


# --------------------------------------------------------------------------- registry


def test_registry_and_errors() -> None:
    assert set(DATASETS) == {
        "dermamnist",
        "pneumoniamnist",
        "isic2018",
        "ham10000",
        "pad_ufes_20",
        "dermnet",
        "derm7pt",
        "covid_chestxray",
        "iu_xray",
        "nih_cxr14",
        "cxr_samples",
    }
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("chexpert")
    with pytest.raises(ConfigError, match="unknown option"):
        load_dataset("isic2018", seed=1)
    with pytest.raises(DatasetError, match="no sample copy"):
        load_dataset("nih_cxr14")  # not in the sample data: needs root=


def test_default_root_is_the_sample_folder(manifests: dict[str, Manifest], data_dir: Path) -> None:
    m = load_dataset("pad_ufes_20")  # root None -> MEDLENS_DATA/pad-ufes-20
    assert m.root == data_dir / "pad-ufes-20"
    assert m.version == manifests["pad_ufes_20"].version


def test_ids_unique_and_unique_domain(manifests: dict[str, Manifest]) -> None:
    for m in manifests.values():
        ids = [r.id for r in m]
        assert len(ids) == len(set(ids)), m.name
        assert m.domain in ("dermatology", "chest_xray")


# --------------------------------------------------------------------------- counts


def test_medmnist_official_splits(manifests: dict[str, Manifest]) -> None:
    d = manifests["dermamnist"]
    assert Counter(r.split for r in d) == {"train": 7007, "val": 1003, "test": 2005}
    assert d.vocab == "ham10000" and d.domain == "dermatology"
    assert d.label_set() == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert d.arrays is not None and d.arrays["train"].shape == (7007, 28, 28, 3)
    assert all(r.group is None for r in d)  # MedMNIST has no patient ids
    p = manifests["pneumoniamnist"]
    assert Counter(r.split for r in p) == {"train": 2428, "val": 270, "test": 468}
    assert Counter(r.labels[0] for r in p.subset("test")) == {"normal": 234, "pneumonia": 234}
    assert p.domain == "chest_xray" and p.arrays is not None and p.arrays["val"].ndim == 3


def test_isic2018_counts_and_both_label_files_agree(
    manifests: dict[str, Manifest], data_dir: Path
) -> None:
    m = manifests["isic2018"]
    assert len(m) == 1512 and {r.split for r in m} == {"test"}
    assert Counter(r.labels[0] for r in m) == {
        "nv": 909,
        "bkl": 217,
        "mel": 171,
        "bcc": 93,
        "df": 44,
        "akiec": 43,
        "vasc": 35,
    }
    # labels.csv (image_id, dx) read generically must match the official one-hot CSV
    root = data_dir / SAMPLE["isic2018"]
    plain = load_csv_manifest(
        root / "labels.csv", "image_id", "dx", domain="dermatology", vocab="ham10000"
    )
    assert {r.id: r.labels for r in plain} == {r.id: r.labels for r in m}
    assert {r.id: r.path for r in plain} == {r.id: r.path for r in m}


def test_isic2018_official_training_layout(tmp_path: Path, data_dir: Path) -> None:
    src = load_dataset("isic2018", data_dir / SAMPLE["isic2018"])
    picked = src.records[:12]
    inp = tmp_path / "ISIC2018_Task3_Training_Input"
    inp.mkdir()
    cols = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    rows = []
    for r in picked:
        assert r.path is not None
        shutil.copy(r.path, inp / r.path.name)
        rows.append([r.id, *(1.0 if c.lower() == r.labels[0] else 0.0 for c in cols)])
    gt_dir = tmp_path / "ISIC2018_Task3_Training_GroundTruth"  # as the official zip extracts
    gt_dir.mkdir()
    _write_csv(gt_dir / "ISIC2018_Task3_Training_GroundTruth.csv", ["image", *cols], rows)
    _write_csv(
        tmp_path / "ISIC2018_Task3_Training_LesionGroupings.csv",
        ["image", "lesion_id", "diagnosis_confirm_type"],
        [[r.id, f"HAM_{i // 2:07d}", ""] for i, r in enumerate(picked)],
    )
    assert detect_dataset(tmp_path) == "isic2018"
    m = load_dataset("isic2018", tmp_path)
    assert [(r.id, r.labels, r.split) for r in m] == [(r.id, r.labels, "train") for r in picked]
    assert m.records[0].group == m.records[1].group == "HAM_0000000"


def test_pad_ufes_20_image_rows(manifests: dict[str, Manifest], data_dir: Path) -> None:
    with open(data_dir / SAMPLE["pad_ufes_20"] / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with_image = [r for r in rows if r["image"].strip()]
    m = manifests["pad_ufes_20"]
    assert len(rows) == 2298 and len(m) == len(with_image) == 1650
    assert Counter(r.labels[0] for r in m) == Counter(r["diagnostic"] for r in with_image)
    assert m.label_set() == {"BCC", "ACK", "NEV", "SEK", "SCC", "MEL"}
    r = next(r for r in m if r.id == "PAT_46_881_939")
    assert r.group == "PAT_46" and r.meta["region"] == "NECK" and r.meta["fitspatrick"] == "3.0"
    assert r.meta["itch"] == "True" and r.meta["hurt"] == "False"
    assert r.text == (
        "55-year-old, lesion on the neck; itches, has grown, has changed, bleeds, is raised; "
        "no pain"
    )


def test_render_pad_symptoms() -> None:
    row = {
        "age": "62",
        "region": "FOREARM",
        "itch": "True",
        "grew": "True",
        "hurt": "False",
        "changed": "UNK",
        "bleed": "True",
        "elevation": "",
    }
    assert render_pad_symptoms(row) == (
        "62-year-old, lesion on the forearm; itches, has grown, bleeds; no pain"
    )
    assert render_pad_symptoms({"region": "FACE", "bleed": "False"}) == (
        "Lesion on the face; no bleeding"
    )
    assert render_pad_symptoms({}) == ""


def test_dermnet_counts(manifests: dict[str, Manifest]) -> None:
    m = manifests["dermnet"]
    assert len(m) == 3118 and len(m.label_set()) == 47
    assert all(r.group is not None and len(r.group) == 64 for r in m)  # sha256 hex
    # the same file listed under two conditions is one group
    by_path = defaultdict(set)
    for r in m:
        by_path[r.path].add(r.group)
    assert all(len(g) == 1 for g in by_path.values())
    assert sum(1 for g in Counter(r.path for r in m).values() if g > 1) == 136


def test_covid_chestxray(manifests: dict[str, Manifest], data_dir: Path) -> None:
    m = manifests["covid_chestxray"]
    assert len(m) == 573
    with open(data_dir / SAMPLE["covid_chestxray"] / "metadata.csv", newline="") as fh:
        finding = {r["image"]: r["finding"] for r in csv.DictReader(fh)}
    for r in m:
        if finding[r.id] in ("todo", "Unknown"):
            assert r.labels == ()
        else:
            assert ", ".join(r.labels) == finding[r.id]
    assert sum(1 for r in m if r.labels == ()) == 85
    assert sum(1 for r in m if set(r.labels) == {"COVID-19", "ARDS"}) == 12
    assert sum(1 for r in m if r.text) == 450
    assert {"view", "sex", "age", "license"} <= set(m.records[0].meta)


def test_iu_xray_reports(manifests: dict[str, Manifest]) -> None:
    m = manifests["iu_xray"]
    assert len(m) == 3955
    assert Counter(r.split for r in m) == {"train": 2069, "val": 296, "test": 590, None: 1000}
    assert all(r.labels == () and r.path is None for r in m)
    r = next(r for r in m if r.id == "CXR10")
    assert r.text is not None and r.text.endswith("No acute cardiopulmonary process.")
    assert r.meta["mesh_major"] == ("Calcified Granuloma/lung/upper lobe/right",)
    assert sum(1 for r in m if r.text) == 3955 - 28  # 28 reports have neither section


def test_cxr_samples(manifests: dict[str, Manifest]) -> None:
    m = manifests["cxr_samples"]
    got = {r.id: (m.vocab_of(r), r.labels) for r in m}
    assert len(got) == 8
    assert got["00000001_000.png"] == ("nih_cxr14", ("Cardiomegaly",))
    assert got["00027426_000.png"] == ("nih_cxr14", ("No Finding",))
    assert got["h0001.png"] == ("tbx11k", ("healthy",))
    assert got["tb0005.png"][1] == got["tb0007.png"][1] == ("tb",)
    assert got["16747_3_1.jpg"][1] == ()
    assert sum(1 for k, (_, labels) in got.items() if k.endswith(".dcm") and not labels) == 2


# --------------------------------------------------------------------------- splits


@pytest.mark.parametrize("name", ["pad_ufes_20", "covid_chestxray", "dermnet"])
def test_grouped_splits_never_leak(manifests: dict[str, Manifest], name: str) -> None:
    m = manifests[name]
    _assert_grouped(m)
    n = Counter(r.split for r in m)
    target = (
        {"train": 0.6, "val": 0.2, "test": 0.2}
        if name == "pad_ufes_20"
        else {"train": 0.70, "val": 0.15, "test": 0.15}
    )
    for split, share in target.items():
        assert abs(n[split] / len(m) - share) < 0.02, (name, dict(n))


def test_pad_folds_are_patient_grouped(manifests: dict[str, Manifest]) -> None:
    m = manifests["pad_ufes_20"]
    folds: dict[str | None, set[int]] = defaultdict(set)
    for r in m:
        folds[r.group].add(r.meta["fold"])
    assert all(len(f) == 1 for f in folds.values())
    sizes = Counter(r.meta["fold"] for r in m)
    assert set(sizes) == set(range(5)) and max(sizes.values()) - min(sizes.values()) < 40
    rule = {0: "train", 1: "train", 2: "train", 3: "val", 4: "test"}
    assert all(r.split == rule[r.meta["fold"]] for r in m)


def test_versions_stable_and_option_sensitive(
    manifests: dict[str, Manifest], data_dir: Path
) -> None:
    for name in ("dermamnist", "dermnet", "iu_xray", "cxr_samples"):
        again = load_dataset(name, data_dir / SAMPLE[name])
        assert again.version == manifests[name].version
        assert [(r.id, r.split) for r in again] == [(r.id, r.split) for r in manifests[name]]
    root = data_dir / SAMPLE["dermnet"]
    reseeded = load_dataset("dermnet", root, seed=1)
    assert reseeded.version != manifests["dermnet"].version
    assert [r.split for r in reseeded] != [r.split for r in manifests["dermnet"]]
    assert load_dataset("dermnet", root, seed=0).version == manifests["dermnet"].version
    pad = data_dir / SAMPLE["pad_ufes_20"]
    other = load_dataset(
        "pad_ufes_20", pad, split_folds={"train": [1, 2, 3], "val": [4], "test": [0]}
    )
    assert other.version != manifests["pad_ufes_20"].version
    covid = load_dataset(
        "covid_chestxray",
        data_dir / SAMPLE["covid_chestxray"],
        fractions={"train": 0.8, "val": 0.1, "test": 0.1},
    )
    assert covid.version != manifests["covid_chestxray"].version
    with pytest.raises(ConfigError):
        load_dataset("covid_chestxray", fractions={"train": 0.8, "test": 0.1})


# --------------------------------------------------------------------------- pixels


def test_image_is_rgb_uint8(manifests: dict[str, Manifest]) -> None:
    for name in ("dermamnist", "pneumoniamnist", "isic2018", "covid_chestxray"):
        m = manifests[name]
        px = m.image(m.records[-1])
        assert px.dtype == np.uint8 and px.ndim == 3 and px.shape[2] == 3, name
    d = manifests["dermamnist"]
    r = d.subset("val").records[5]
    assert d.arrays is not None
    assert np.array_equal(d.image(r), d.arrays["val"][5])


# --------------------------------------------------------------------------- layouts


def test_detect_every_sample_folder(data_dir: Path, tmp_path: Path) -> None:
    for name in IN_SAMPLE:
        assert detect_dataset(data_dir / SAMPLE[name]) == name
    assert detect_dataset(data_dir / "dermnet" / "labels.csv") == "dermnet"
    assert detect_dataset(data_dir / "isic2018-task3-test" / "labels.csv") == "isic2018"
    assert detect_dataset(data_dir / "pad-ufes-20" / "metadata.csv") == "pad_ufes_20"
    assert detect_dataset(data_dir / "covid-chestxray" / "metadata.csv") == "covid_chestxray"
    assert detect_dataset(data_dir / "dermamnist" / "dermamnist.npz") == "dermamnist"
    assert detect_dataset(tmp_path) is None
    assert load_path(data_dir / "dermamnist" / "dermamnist.npz").name == "dermamnist"


def test_every_sample_folder_loads_by_its_folder_path(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: ``medlens index ../shared/data/isic2018-task3-test`` failed with "no ...
    GroundTruth.csv ... in <data root>": a folder named like the GT CSV's stem was taken
    for the CSV's zip folder and its parent loaded instead."""
    import os

    monkeypatch.chdir(data_dir.parent)  # a relative path, as typed in the docs' example
    for name in IN_SAMPLE:
        folder = data_dir / SAMPLE[name]
        for path in (folder, Path(os.path.relpath(folder))):
            m = load_path(path)
            assert m.name == name and Path(m.root).resolve() == folder.resolve(), path
            assert len(m.records) == len(load_dataset(name).records)
    isic = data_dir / SAMPLE["isic2018"]
    for index_file in ("ISIC2018_Task3_Test_GroundTruth.csv", "labels.csv"):
        assert Path(load_path(isic / index_file).root).resolve() == isic.resolve()


def test_load_folder_class_and_flat(tmp_path: Path, data_dir: Path) -> None:
    src = load_dataset("dermnet", data_dir / SAMPLE["dermnet"])
    picked = {}
    for r in src:
        if r.labels[0] in ("Psoriasis", "Vitiligo") and r.path not in picked.values():
            picked[r.id] = r.path
    for i, (rid, path) in enumerate(sorted(picked.items())[:8]):
        cond = rid.split("/")[0]
        dest = tmp_path / ("train" if i % 2 else "test") / cond / Path(path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    m = load_folder(tmp_path, "dermatology", vocab="dermnet")
    assert len(m) == 8 and m.label_set() <= {"Psoriasis", "Vitiligo"}
    assert {r.split for r in m} == {"train", "test"} and m.vocab == "dermnet"
    flat = load_folder(data_dir / "cxr-samples", "chest_xray")
    assert len(flat) == 8 and flat.label_set() == set() and {r.split for r in flat} == {None}
    with pytest.raises(ConfigError):
        load_folder(tmp_path, "cardiology")


def test_ham10000_layout(tmp_path: Path, data_dir: Path) -> None:
    isic = load_dataset("isic2018", data_dir / SAMPLE["isic2018"])
    picked = isic.records[:60]
    for i, r in enumerate(picked):
        assert r.path is not None
        part = tmp_path / f"HAM10000_images_part_{1 + i % 2}"
        part.mkdir(exist_ok=True)
        shutil.copy(r.path, part / r.path.name)
    # lesion ids group the images in threes; dx are the images' real ISIC labels
    _write_csv(
        tmp_path / "HAM10000_metadata.csv",
        ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"],
        [[f"HAM_{i // 3:07d}", r.id, r.labels[0], "", "", "", ""] for i, r in enumerate(picked)],
    )
    assert detect_dataset(tmp_path) == "ham10000"
    m = load_dataset("ham10000", tmp_path)
    assert len(m) == 60 and m.vocab == "ham10000"
    assert {r.id: r.labels for r in m} == {r.id: r.labels for r in picked}
    _assert_grouped(m)
    assert {r.split for r in m} == {"train", "val", "test"}
    assert load_dataset("ham10000", tmp_path).version == m.version
    assert load_dataset("ham10000", tmp_path, seed=3).version != m.version


def test_nih_cxr14_layout(tmp_path: Path, data_dir: Path) -> None:
    cxr = data_dir / "cxr-samples"
    (tmp_path / "images_001" / "images").mkdir(parents=True)
    for f in ("00000001_000.png", "00027426_000.png"):
        shutil.copy(cxr / f, tmp_path / "images_001" / "images" / f)
    header = [
        "Image Index",
        "Finding Labels",
        "Follow-up #",
        "Patient ID",
        "Patient Age",
        "Patient Gender",
        "View Position",
    ]
    _write_csv(
        tmp_path / "Data_Entry_2017.csv",
        header,
        [
            ["00000001_000.png", "Cardiomegaly", 0, 1, 58, "M", "PA"],
            ["00027426_000.png", "No Finding", 0, 27426, 46, "F", "PA"],
            ["00000002_000.png", "Effusion|Mass", 0, 2, 81, "M", "PA"],  # image not downloaded
        ],
    )
    assert detect_dataset(tmp_path) == "nih_cxr14"
    m = load_dataset("nih_cxr14", tmp_path)
    assert [(r.id, r.labels, r.group) for r in m] == [
        ("00000001_000.png", ("Cardiomegaly",), "1"),
        ("00027426_000.png", ("No Finding",), "27426"),
    ]
    assert m.records[0].meta == {"age": "58", "sex": "M", "view": "PA", "follow_up": "0"}
    unofficial = m.version
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n")
    (tmp_path / "test_list.txt").write_text("00027426_000.png\n")
    m = load_dataset("nih_cxr14", tmp_path, val_fraction=0.0)
    assert [r.split for r in m] == ["train", "test"] and m.version != unofficial
    assert m.image(m.records[0]).shape[2] == 3


# --------------------------------------------------------------------------- knowledge


def test_every_sample_label_maps_to_a_finding(manifests: dict[str, Manifest]) -> None:
    """Each raw label of each sample dataset must reach a finding of its domain's pack;
    a label the pack does not know would silently drop out of every metric."""
    unmapped: list[str] = []
    for m in manifests.values():
        try:
            pack = load_domain(m.domain)
        except FileNotFoundError:
            unmapped.append(f"{m.name}: the {m.domain} pack file does not exist yet")
            continue
        seen: set[tuple[str, str]] = set()
        for r in m:
            for lab in r.labels:
                key = (m.vocab_of(r), lab)
                if key in seen:
                    continue
                seen.add(key)
                try:
                    fid = pack.map_label(*key)
                except ConfigError:
                    fid = None
                if fid is None:
                    unmapped.append(f"{m.name} {key[0]}:{lab}")
    assert not unmapped, f"labels that map to no finding: {sorted(unmapped)}"


def test_ham10000_sample_copy_keeps_its_lesion_split(data_dir: Path) -> None:
    """The sample copy's ``split`` (lesion-grouped, DermaMNIST-consistent) is used as is:
    no lesion crosses splits and DermaMNIST's test images are never in train."""
    m = load_dataset("ham10000")
    assert len(m) == 10015
    counts = {s: sum(r.split == s for r in m.records) for s in ("train", "val", "test")}
    assert counts == {"train": 5810, "val": 1254, "test": 2951}
    by_lesion: dict[str, set[str | None]] = {}
    for r in m.records:
        by_lesion.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in by_lesion.values())
    assert not any(r.split == "train" and r.meta["dermamnist_split"] == "test" for r in m.records)
    assert detect_dataset(data_dir / "ham10000") == "ham10000"


# --------------------------------------------------------------------------- Derm7pt

# Cases per official split and per 5-group, as the data README states (Kawahara et al.).
DERM7PT_CASES = {"train": 413, "val": 203, "test": 395}
DERM7PT_GROUPS = {
    "BCC": (19, 7, 16),
    "NEV": (256, 100, 219),
    "MEL": (90, 61, 101),
    "MISC": (32, 25, 40),
    "SK": (16, 10, 19),
}


def test_derm7pt_official_split_and_views(manifests: dict[str, Manifest]) -> None:
    """One record per image, the official split (valid -> val), both views of a case in
    one split; the 9 cases whose clinical photo is missing have a dermoscopic record only."""
    m = manifests["derm7pt"]
    assert m.vocab == "derm7pt" and m.domain == "dermatology"
    derm = Counter(r.split for r in m if r.meta["view"] == "derm")
    clinic = Counter(r.split for r in m if r.meta["view"] == "clinic")
    assert derm == DERM7PT_CASES
    assert sum(clinic.values()) == 1011 - 9 and len(m) == 2013  # the README's 2,013 files
    assert all(clinic[s] <= n for s, n in DERM7PT_CASES.items())
    _assert_grouped(m)
    by_case: dict[str | None, list[str]] = defaultdict(list)
    for r in m:
        by_case[r.group].append(r.meta["view"])
        assert r.id == f"{r.group}/{r.meta['view']}"
    assert len(by_case) == 1011 and all("derm" in v for v in by_case.values())
    paths = {(r.group, r.meta["view"]): r.path for r in m}
    assert all(
        paths[(g, "clinic")] != paths[(g, "derm")] for g, v in by_case.items() if len(v) == 2
    )
    for split, n in DERM7PT_CASES.items():
        got = Counter(r.meta["group5"] for r in m if r.split == split and r.meta["view"] == "derm")
        idx = list(DERM7PT_CASES).index(split)
        assert got == {g: c[idx] for g, c in DERM7PT_GROUPS.items()}, split
        assert sum(got.values()) == n


def test_derm7pt_view_option_and_meta(data_dir: Path, manifests: dict[str, Manifest]) -> None:
    root = data_dir / SAMPLE["derm7pt"]
    derm = load_dataset("derm7pt", root, view="derm")
    clinic = load_dataset("derm7pt", root, view="clinic")
    assert len(derm) == 1011 and len(clinic) == 1002
    assert {r.meta["view"] for r in derm} == {"derm"}
    assert len({derm.version, clinic.version, manifests["derm7pt"].version}) == 3
    assert load_dataset("derm7pt", root).version == manifests["derm7pt"].version
    with pytest.raises(ConfigError, match="view"):
        load_dataset("derm7pt", root, view="dermoscopy")
    r = next(r for r in derm if r.group == "1")  # first row of meta.csv, verbatim
    assert r.labels == ("basal cell carcinoma",) and r.meta["group5"] == "BCC"
    assert r.meta["vascular_structures"] == "arborizing" and r.meta["seven_point_score"] == "0"
    criteria = (
        "pigment_network",
        "streaks",
        "pigmentation",
        "regression_structures",
        "dots_and_globules",
        "blue_whitish_veil",
        "vascular_structures",
    )
    assert all(r.meta[c] for r in derm for c in criteria)
    assert Path(load_path(root / "meta" / "meta.csv").root) == root
    assert detect_dataset(root / "meta" / "meta.csv") == "derm7pt"


def test_derm7pt_every_image_loads(manifests: dict[str, Manifest]) -> None:
    m = manifests["derm7pt"]
    for r in m:
        px = m.image(r)
        assert px.dtype == np.uint8 and px.ndim == 3 and px.shape[2] == 3, r.id
        assert max(px.shape[:2]) == 224, r.id  # the sample copy's longer side


def test_derm7pt_labels_map_to_findings(manifests: dict[str, Manifest]) -> None:
    """Every labelled record reaches a finding; the unlabelled ones are exactly the
    diagnoses without a finding (melanosis, miscellaneous), still in group MISC; the
    5 groups agree with the findings they contain."""
    m = manifests["derm7pt"]
    pack = load_domain("dermatology")
    group_findings: dict[str, set[str]] = defaultdict(set)
    for r in (r for r in m if r.meta["view"] == "derm"):
        found = pack.findings_for(m.vocab, r.labels)
        if not r.labels:
            assert r.meta["diagnosis"] in ("melanosis", "miscellaneous")
            assert r.meta["group5"] == "MISC" and found == []
            continue
        assert len(found) == 1, r.id
        group_findings[r.meta["group5"]].update(found)
    assert group_findings == {
        "BCC": {"basal_cell_carcinoma"},
        "NEV": {"melanocytic_nevus"},
        "MEL": {"melanoma"},
        "MISC": {"dermatofibroma", "seborrheic_keratosis", "vascular_lesion"},
        "SK": {"seborrheic_keratosis"},
    }
    assert sum(not r.labels for r in m if r.meta["view"] == "derm") == 16 + 8
