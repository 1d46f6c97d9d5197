"""A domain is a YAML file: adding a third pack in a folder needs no code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from medlens.analysis import domain as domain_mod
from medlens.analysis.triage import level_thresholds
from medlens.config import Settings
from medlens.errors import ConfigError
from medlens.io.types import StudyContext
from medlens.knowledge import domains, load_domain, use_pack_dirs

FUNDUS = {
    "id": "fundus",
    "name": "Retinal fundus photography",
    "task": "single_label",
    "order": 5,
    "triage_thresholds": {"urgent": 0.3, "soon": 0.5},
    "dicom": {"modalities": ["OP"]},
    "domain_prompts": [
        "a retinal fundus photograph",
        "a colour photograph of the back of the eye",
        "an image of the optic disc and retinal vessels",
    ],
    "findings": [
        {
            "id": "diabetic_retinopathy",
            "name": "Diabetic retinopathy",
            "description": {
                "presentation": "Damage to the retinal vessels caused by long-standing diabetes.",
                "history": "Years of diabetes; often no symptoms until late stages.",
                "image_features": "Microaneurysms, dot-blot haemorrhages and hard exudates.",
                "differentials": "Hypertensive retinopathy, retinal vein occlusion.",
            },
            "prompts": [
                "a fundus photo with diabetic retinopathy",
                "retinal microaneurysms and haemorrhages",
                "hard exudates on a fundus photograph",
                "a fundus image showing diabetic eye disease",
                "dot and blot haemorrhages in the retina",
            ],
            "risk": "urgent",
            "next_step": "Refer to ophthalmology for grading and treatment.",
            "icd10": ["E11.319"],
            "snomed": "4855003",
        },
        {
            "id": "normal_fundus",
            "name": "Normal fundus",
            "description": {
                "presentation": "A healthy retina with a normal optic disc and vessels.",
                "history": "No visual symptoms; a screening examination.",
                "image_features": "Sharp disc margins, normal vessel calibre, clear macula.",
                "differentials": "Early retinopathy that is not yet visible.",
            },
            "prompts": [
                "a normal fundus photograph",
                "a healthy retina",
                "a normal optic disc and retinal vessels",
                "an unremarkable fundus image",
                "a fundus photo with no retinopathy",
            ],
            "risk": "routine",
            "next_step": "Routine screening at the usual interval.",
            "icd10": ["Z01.00"],
            "snomed": "102468008",
        },
    ],
}


@pytest.fixture()
def third_pack(tmp_path: Path):
    folder = tmp_path / "packs"
    folder.mkdir()
    (folder / "fundus.yaml").write_text(yaml.safe_dump(FUNDUS), "utf-8")
    use_pack_dirs([folder])
    try:
        yield folder
    finally:
        use_pack_dirs([])


def test_packaged_domains_are_discovered_in_their_order() -> None:
    assert domains() == ("dermatology", "chest_xray")
    assert level_thresholds("chest_xray") == {"urgent": 0.5, "soon": 0.6}


def test_a_yaml_file_adds_a_domain(third_pack: Path) -> None:
    assert domains() == ("dermatology", "chest_xray", "fundus")
    pack = load_domain("fundus")
    assert pack.finding_ids == ["diabetic_retinopathy", "normal_fundus"]
    assert level_thresholds("fundus") == {"urgent": 0.3, "soon": 0.5}
    ctx = StudyContext(source_format="dicom", width=64, height=64, modality="OP")
    assert domain_mod.domain_from_context(ctx) == "fundus"
    cr = StudyContext(source_format="dicom", width=64, height=64, modality="CR")
    assert domain_mod.domain_from_context(cr) == "chest_xray"
    ct = StudyContext(source_format="dicom", width=64, height=64, modality="CT")
    assert domain_mod.domain_from_context(ct) is None


def test_removing_the_folder_removes_the_domain(third_pack: Path) -> None:
    use_pack_dirs([])
    assert "fundus" not in domains()
    with pytest.raises(ConfigError, match="unknown domain"):
        load_domain("fundus")


def test_a_pack_may_not_shadow_a_packaged_domain(tmp_path: Path) -> None:
    (tmp_path / "dermatology.yaml").write_text(yaml.safe_dump(FUNDUS), "utf-8")
    use_pack_dirs([tmp_path])
    try:
        with pytest.raises(ConfigError, match="reuses the domain id"):
            domains()
    finally:
        use_pack_dirs([])


def test_analyze_scores_and_detects_the_added_domain(third_pack: Path, data_dir: Path) -> None:
    from medlens.pipeline import MedLens

    image = next((data_dir / "isic2018-task3-test" / "images").glob("*.jpg"))
    lens = MedLens(settings=Settings(knowledge_dirs=(third_pack,)), retrieval=False)
    auto = lens.analyze(image)
    assert set(auto.domain_scores) == {"dermatology", "chest_xray", "fundus"}
    assert np.isclose(sum(auto.domain_scores.values()), 1.0, atol=1e-3)
    given = lens.analyze(image, domain="fundus", top_k=2)
    assert given.domain == "fundus"
    probs = [f["probability"] for f in given.to_dict()["findings"]]
    assert len(probs) == 2 and np.isclose(sum(probs), 1.0, atol=1e-3)
    assert given.triage.level in ("urgent", "routine")


def test_a_pack_with_bad_exclusions_is_refused_with_its_file_name(tmp_path: Path) -> None:
    """``excludes`` belongs to multi-label packs (a differential is exclusive already) and
    names findings of the pack: a mistake is a ConfigError naming the file, never a
    silently unconstrained score."""
    folder = tmp_path / "packs"
    folder.mkdir()
    bad = {**FUNDUS, "findings": [*FUNDUS["findings"][:1], {
        **FUNDUS["findings"][1], "excludes": ["any_other_finding"]}]}  # fmt: skip
    (folder / "fundus.yaml").write_text(yaml.safe_dump(bad), "utf-8")
    use_pack_dirs([folder])
    try:
        with pytest.raises(ConfigError, match=r"(?s)fundus\.yaml.*excludes is for multi_label"):
            load_domain("fundus")
        multi = {**bad, "task": "multi_label", "reference_prompts": ["a normal fundus"]}
        (folder / "fundus.yaml").write_text(yaml.safe_dump(multi), "utf-8")
        use_pack_dirs([])
        use_pack_dirs([folder])
        pack = load_domain("fundus")
        assert pack.exclusions == ((1, (0,)),)
    finally:
        use_pack_dirs([])
