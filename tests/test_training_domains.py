"""Lite training is built per knowledge pack: a third pack added from a folder (the
tiny "fundus" pack of test_domains.py) gets its own finding column, prompts, loss and
validation score, and joins the domain-classification target, with no code change."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from test_domains import FUNDUS

from medlens.datasets import load_dataset
from medlens.datasets.generic import load_folder
from medlens.embeddings import record_features
from medlens.knowledge import domains, use_pack_dirs
from medlens.models.lite import LiteEncoder
from medlens.training.align import (
    AlignConfig,
    PromptBank,
    batch_loss,
    build_table,
    evaluate_heads,
    train_align,
)
from medlens.training.lora import _flips, make_augment

VOCAB = "fundus_demo"


def _pack_dir(tmp: Path, **changes: Any) -> Path:
    """The FUNDUS pack, its findings mapped to the ``fundus_demo`` labels DR / Normal."""
    pack = copy.deepcopy(FUNDUS)
    for finding, label in zip(pack["findings"], ("DR", "Normal"), strict=True):
        finding["labels"] = {VOCAB: [label]}
    pack.update(changes)
    folder = tmp / "packs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fundus.yaml").write_text(yaml.safe_dump(pack), "utf-8")
    return folder


@pytest.fixture()
def fundus(tmp_path: Path):
    use_pack_dirs([_pack_dir(tmp_path)])
    try:
        assert domains() == ("dermatology", "chest_xray", "fundus")
        yield tmp_path
    finally:
        use_pack_dirs([])


def _fundus_folder(tmp: Path, data_dir: Path, per_class: int = 4) -> Path:
    """A class-folder dataset for the added pack. There is no fundus photography in the
    sample data: real ISIC images stand in (the test is about the plumbing, not retinas)."""
    images = sorted((data_dir / "isic2018-task3-test" / "images").glob("*.jpg"))
    root = tmp / "fundus_demo"
    for k, label in enumerate(("DR", "Normal")):
        (root / label).mkdir(parents=True)
        for im in images[k * per_class : (k + 1) * per_class]:
            shutil.copy(im, root / label / im.name)
    return root


def test_a_third_pack_gets_its_column_prompts_loss_and_score(fundus: Path, data_dir: Path) -> None:
    enc = LiteEncoder.untrained(seed=0)
    derm, cxr = load_dataset("dermamnist"), load_dataset("pneumoniamnist")
    eye = load_folder(_fundus_folder(fundus, data_dir), "fundus", vocab=VOCAB)
    splits = [
        (derm, [r for r in derm.records if r.split == "train"][:6]),
        (cxr, [r for r in cxr.records if r.split == "train"][:6]),
        (eye, list(eye.records)),
    ]
    feats = [record_features(enc, m, recs, store=None) for m, recs in splits]
    table = build_table(splits, feats, balance=True)

    assert list(table.target) == ["dermatology", "chest_xray", "fundus"]
    assert list(table.mask) == ["chest_xray"]  # the only multi-label pack
    assert table.target["fundus"].tolist() == [-1] * 12 + [0] * 4 + [1] * 4
    assert (table.target["dermatology"][12:] == -1).all()
    assert not table.mask["chest_xray"][12:].any()
    assert table.domain.tolist() == [0] * 6 + [1] * 6 + [2] * 8
    assert {f"{eye.name}:diabetic_retinopathy", f"{eye.name}:normal_fundus"} <= set(table.classes)

    bank = PromptBank(enc)
    assert list(bank.groups) == [
        "findings/dermatology",
        "findings/chest_xray",
        "reference/chest_xray",
        "findings/fundus",
        "domains",
    ]
    assert bank.groups["findings/fundus"][0] == FUNDUS["findings"][0]["prompts"]
    assert bank.groups["domains"][2] == FUNDUS["domain_prompts"]
    assert bank.embed(enc.text_head)["domains"].shape[0] == 3

    loss, parts = batch_loss(enc, bank, table, np.arange(len(table.classes)), None, AlignConfig())
    assert list(parts) == ["dermatology", "chest_xray", "fundus", "domain"]
    assert all(np.isfinite(v) and v > 0 for v in parts.values()), parts
    loss.backward()
    assert all(p.grad is not None for p in enc.text_head.parameters())
    # Only the fundus rows drive the fundus loss: it is a cross-entropy over 2 findings.
    only_eye = np.arange(12, 20)
    _, eye_parts = batch_loss(enc, bank, table, only_eye, None, AlignConfig())
    assert list(eye_parts) == ["fundus", "domain"]

    scores = evaluate_heads(enc, bank, table)
    assert {"dermamnist", eye.name} <= set(scores)
    assert 0.0 <= scores[eye.name] <= 1.0


def test_heads_only_training_runs_with_a_third_pack(
    fundus: Path, data_dir: Path, tmp_path: Path
) -> None:
    """One epoch on real DermaMNIST / PneumoniaMNIST with the added pack in the domain
    target (no dataset of the sample data maps to it)."""
    cfg = AlignConfig(
        data=("dermamnist", "pneumoniamnist"), epochs=1, batch_size=16, limit=16, seed=0
    )
    out = tmp_path / "run"
    metrics = train_align(cfg, out, tmp_path / "cache")
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 1 and metrics["best_epoch"] == 1
    assert set(history[0]["loss"]) == {"dermatology", "chest_xray", "domain"}
    assert all(np.isfinite(v) for v in history[0]["loss"].values())
    assert "dermamnist" in history[0]["val"]


def test_augmentation_flips_follow_the_packs(tmp_path: Path, data_dir: Path) -> None:
    """Flips come from the pack's ``test_time_flips``: none declared = a canonical
    orientation, augmented exactly like chest X-rays; flips declared = the free recipe."""
    from torchvision.transforms import v2

    kinds = lambda d: [type(t) for t in _flips(d)]  # noqa: E731
    assert _flips("chest_xray") is None  # canonical orientation: never flipped
    assert kinds("dermatology") == [v2.RandomHorizontalFlip, v2.RandomVerticalFlip]
    assert kinds(None) == kinds("dermatology")
    isic = load_dataset("isic2018")
    image = isic.image(isic.records[0])

    def augmented(domain: str) -> np.ndarray:
        torch.manual_seed(0)
        return make_augment(seed_size=64)(image, domain)

    cases = (
        ([], None, "chest_xray"),
        (["horizontal"], [v2.RandomHorizontalFlip], None),
        (["vertical", "both"], [v2.RandomHorizontalFlip, v2.RandomVerticalFlip], "dermatology"),
        (["both"], [v2.RandomApply], None),
    )
    for i, (flips, expected, same_as) in enumerate(cases):
        use_pack_dirs([_pack_dir(tmp_path / str(i), test_time_flips=flips)])
        try:
            assert (_flips("fundus") if expected is None else kinds("fundus")) == expected
            out = augmented("fundus")
            assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
            if same_as is not None:  # same recipe, same random stream
                np.testing.assert_array_equal(out, augmented(same_as))
        finally:
            use_pack_dirs([])
