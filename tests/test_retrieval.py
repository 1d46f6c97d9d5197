"""Case library, vector stores and knowledge RAG on the real sample data (the embedding
cache has its own tests: test_embeddings.py).

The encoder is the real lite model (pretrained MobileNetV2 + MiniLM towers) with
deterministic untrained heads saved to a heads file and loaded back through
``load_encoder("lite:<file>")``, exactly as a user's own training run would be: these
tests check retrieval mechanics (idempotency, resume, filters, provenance), which do not
depend on how well the packaged heads were trained, and they must not wait for them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medlens.datasets import load_dataset
from medlens.errors import ConfigError
from medlens.retrieval import (
    build_demo_library,
    check_libraries,
    knowledge_passages,
    similar_cases,
)
from medlens.retrieval.library import (
    case_id,
    ingest,
    read_library,
    record_hash,
    resolve_thumbnail,
    search,
    subset,
)
from medlens.retrieval.store import (
    DEFAULT_INDEX,
    INT8_INDEX,
    Condition,
    EdgeStore,
    IndexSettings,
    PointData,
    ServerStore,
    open_store,
    parse_filter,
)


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medlens.models.lite import LiteEncoder

    path = tmp_path_factory.mktemp("heads") / "test_heads.safetensors"
    LiteEncoder.untrained(seed=0).save_heads(path, {"purpose": "retrieval tests"})
    return path


@pytest.fixture(scope="module")
def encoder(heads_file: Path) -> Any:
    from medlens.models import load_encoder

    return load_encoder(f"lite:{heads_file}")


@pytest.fixture(scope="module")
def mixed(data_dir: Path) -> list[Any]:
    """Small manifests: ISIC images, COVID images with notes, cxr-samples (incl. DICOM)."""
    isic = subset(load_dataset("isic2018"), 14)
    covid = load_dataset("covid_chestxray")
    covid = subset(replace(covid, records=[r for r in covid.records if r.text]), 10)
    return [isic, covid, load_dataset("cxr_samples")]


def opaque_id(manifest: Any, record: Any) -> str:
    """The opaque case id a record gets in this installation (the default)."""
    return case_id(record_hash(manifest, record), manifest.name, str(record.id))


def record_of(manifest: Any, file_name: str) -> Any:
    return next(r for r in manifest.records if r.path is not None and r.path.name == file_name)


# ----------------------------------------------------------------------------- filters


def test_parse_filter_forms() -> None:
    assert parse_filter("label=mel") == Condition("labels", "eq", "mel")
    assert parse_filter("labels=mel,bcc") == Condition("labels", "in", ["mel", "bcc"])
    assert parse_filter("age>=40") == Condition("age", "gte", 40.0)
    assert parse_filter("age<18") == Condition("age", "lt", 18.0)
    assert parse_filter("sex=female") == Condition("sex", "eq", "F")
    for bad in ("label", "age>=old", "x!=3", ">=3"):
        with pytest.raises(ConfigError):
            parse_filter(bad)


# ----------------------------------------------------------------------------- stores


def _points(n: int = 300, dim: int = 16) -> list[PointData]:
    rng = np.random.default_rng(0)
    pts = []
    for i in range(n):
        vecs = {"image": rng.standard_normal(dim).astype(np.float32)}
        if i % 3 == 0:
            vecs["text"] = rng.standard_normal(dim).astype(np.float32)
        payload = {
            "labels": [["mel", "nv", "bcc"][i % 3]],
            "age": float(20 + i % 60),
            "sex": "MF"[i % 2],
            "i": i,
        }
        pts.append(PointData(f"00000000-0000-0000-0000-{i:012d}", vecs, payload))
    return pts


def test_embedded_and_server_backends_agree(tmp_path: Path) -> None:
    """The server code path (qdrant-client, here against its local mode) and the
    embedded engine return the same exact neighbours under the same filters."""
    pts = _points()
    stores = [EdgeStore(tmp_path / "edge"), ServerStore(location=":memory:")]
    q = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    cases = [
        [],
        [Condition("labels", "eq", "mel")],
        [Condition("labels", "in", ["nv", "bcc"]), Condition("age", "gte", 40.0)],
        [Condition("sex", "eq", "F"), Condition("age", "lt", 30.0)],
        [Condition("age", "eq", 33.0)],
    ]
    results = []
    for s in stores:
        s.create("t", {"image": 16, "text": 16})
        s.upsert("t", pts)
        assert s.count("t") == len(pts)
        assert s.present("t", [pts[0].id, "00000000-0000-0000-0000-999999999999"]) == {pts[0].id}
        got = []
        for conds in cases:
            hits = s.search("t", q, "image", k=10, filters=conds, exact=True)
            got.append([h.payload["i"] for h in hits])
        text_hits = s.search("t", q, "text", k=50, exact=True)
        assert {h.payload["i"] % 3 for h in text_hits} == {0}  # only points with a text vector
        got.append([h.payload["i"] for h in text_hits])
        results.append(got)
        scrolled = list(s.scroll("t", with_vectors=True))
        assert len(scrolled) == len(pts)
        s.drop("t")
        assert not s.exists("t")
    assert results[0] == results[1]
    # The filtered results really satisfy their filters.
    assert all(pts[i].payload["labels"] == ["mel"] for i in results[0][1])
    assert all(pts[i].payload["age"] >= 40 for i in results[0][2])
    assert all(pts[i].payload["age"] == 33.0 for i in results[0][4])


@pytest.mark.parametrize("index", [DEFAULT_INDEX, INT8_INDEX], ids=["float32", "int8"])
def test_index_settings_build_what_they_say_and_search_agrees(tmp_path: Path, index) -> None:
    """Both backends create collections with the graph and quantization an
    ``IndexSettings`` names, and indexed search (HNSW, int8 with float32 re-scoring)
    finds the exact neighbours on a set small enough for it to be exact."""
    pts = _points()
    q = np.random.default_rng(2).standard_normal(16).astype(np.float32)
    edge = EdgeStore(tmp_path / "edge", index=index)
    server = ServerStore(location=":memory:", index=index)
    for s in (edge, server):
        s.create("t", {"image": 16, "text": 16})
        s.upsert("t", pts)
        exact = [h.id for h in s.search("t", q, "image", k=10, exact=True)]
        assert [h.id for h in s.search("t", q, "image", k=10)] == exact
    cfg = json.loads((tmp_path / "edge" / "t" / "edge_config.json").read_text())
    text = json.dumps(cfg)
    assert f'"m": {index.m}' in text and f'"ef_construct": {index.ef_construct}' in text
    assert ("int8" in text.lower()) == (index.quantization == "int8")
    # qdrant-client's local mode keeps the HNSW settings but drops quantization (a
    # server keeps both; benchmarks/vector_search.py --qdrant-url measures one).
    assert server.client.get_collection("t").config.hnsw_config.m == index.m
    with pytest.raises(ConfigError, match="quantization"):
        IndexSettings(quantization="int4")


def test_filtered_searches_use_their_own_beam_width(tmp_path: Path) -> None:
    """``filtered_ef`` sets the HNSW beam of filtered searches only; an explicit ``ef``
    wins over both; a search with either width still finds the exact filtered top-k."""
    s = IndexSettings(search_ef=200, filtered_ef=40)
    assert (s.ef(filtered=False), s.ef(filtered=True), s.ef(True, override=7)) == (200, 40, 7)
    assert IndexSettings(search_ef=90).ef(filtered=True) == 90  # unset: the search ef
    with pytest.raises(ConfigError):
        IndexSettings(filtered_ef=0)
    pts = _points()
    q = np.random.default_rng(5).standard_normal(16).astype(np.float32)
    cond = [Condition("age", "gte", 50.0)]
    for store in (
        EdgeStore(tmp_path / "edge", index=s),
        ServerStore(location=":memory:", index=s),
    ):
        store.create("t", {"image": 16, "text": 16})
        store.upsert("t", pts)
        exact = [h.id for h in store.search("t", q, "image", k=5, filters=cond, exact=True)]
        assert [h.id for h in store.search("t", q, "image", k=5, filters=cond)] == exact
        assert all(h.payload["age"] >= 50 for h in store.search("t", q, "image", filters=cond))


# ----------------------------------------------------------------------------- library


def test_ingest_is_idempotent_and_warm_cache_skips_the_model(encoder, mixed) -> None:
    isic = mixed[0]
    reps = [ingest(m, encoder, "t_idem", workers=1) for m in mixed]
    for m, r in zip(mixed, reps, strict=True):
        assert r.indexed == len(m.records) and not r.failed, r.to_dict()
    again = [ingest(m, encoder, "t_idem", workers=1) for m in mixed]
    assert all(
        r.indexed == 0 and r.already_indexed == len(m.records)
        for m, r in zip(mixed, again, strict=True)
    )
    store = open_store()
    derm = read_library("t_idem")["collections"]
    assert len(derm) == 2  # dermatology + chest_xray, one collection each for this model
    assert sum(store.count(c) for c in derm) == sum(len(m.records) for m in mixed)
    for c in derm.values():
        assert c["status"] == "ready" and c["fingerprint"] == encoder.fingerprint
    # A new library with the same model: every image embedding comes from the cache.
    warm = ingest(isic, encoder, "t_idem_warm", workers=1)
    assert warm.image_forward == 0 and warm.image_cache_hits == len(isic.records)


def test_payload_has_labels_text_thumbnail_and_no_identifiers(encoder, mixed) -> None:
    from medlens.io import load_image

    for m in mixed:
        ingest(m, encoder, "t_idem", workers=1)
    store = open_store()
    payloads = [p.payload for c in read_library("t_idem")["collections"] for p in store.scroll(c)]
    covid = [p for p in payloads if p["dataset"] == "covid_chestxray"]
    assert covid and all(p["text"] for p in covid) and any(p["labels"] for p in covid)
    thumbs = [p["thumbnail"] for p in payloads if p.get("thumbnail")]
    assert thumbs and not any(Path(t).is_absolute() for t in thumbs)
    assert all(resolve_thumbnail(t).is_file() for t in thumbs)  # resolved server-side
    isic = [p for p in payloads if p["dataset"] == "isic2018"]
    assert all(p["findings"] for p in isic)
    dumped = json.dumps(payloads)
    dicoms = [r.path for r in mixed[2].records if r.path.suffix == ".dcm"]
    assert dicoms
    seen_identifiers = 0
    for path in dicoms:
        ids = load_image(path).identifiers.values
        for v in ids.values():
            if len(str(v)) >= 4:
                seen_identifiers += 1
                assert str(v) not in dumped
    assert seen_identifiers > 0  # the sample DICOMs do carry identifiers to keep out


def test_search_modes_and_filters(encoder, mixed) -> None:
    from medlens.io import load_image

    isic, covid, _ = mixed
    for m in mixed:
        ingest(m, encoder, "t_idem", workers=1)
    fp = encoder.fingerprint
    rec = isic.records[0]
    img = encoder.embed_images([load_image(rec.path).pixels])[0]
    top = search(img, fp, library="t_idem", domain="dermatology", k=5)
    assert top[0]["case_id"] == opaque_id(isic, rec) and top[0]["similarity"] > 0.999
    assert {"case_id", "labels", "similarity", "text", "thumbnail"} <= set(top[0])
    lab = rec.labels[0]
    only = search(img, fp, library="t_idem", k=5, filters=[parse_filter(f"label={lab}")])
    assert only and all(lab in r["labels"] for r in only)
    # text→text: a note finds itself; image→text returns notes; text→image returns images.
    note = covid.records[0].text
    q = encoder.embed_texts([note])[0]
    tt = search(q, fp, using="text", library="t_idem", domain="chest_xray", k=3)
    assert tt[0]["text"] == note and tt[0]["similarity"] > 0.999
    old = search(
        q,
        fp,
        using="image",
        library="t_idem",
        domain="chest_xray",
        k=20,
        filters=[parse_filter("age>=50")],
    )
    assert old and all(r["age"] >= 50 for r in old)
    cxr_img = encoder.embed_images([load_image(covid.records[0].path).pixels])[0]
    it = search(cxr_img, fp, using="text", library="t_idem", domain="chest_xray", k=5)
    assert it and all(r["text"] for r in it)


@pytest.mark.slow
def test_sigkill_mid_ingest_then_resume_matches_clean_ingest(encoder, heads_file, data_dir):
    """A real ingest process is SIGKILLed after some batches; resuming yields exactly the
    points of an uninterrupted ingest: none missing, none duplicated, none corrupt, and
    the same search results."""
    script = textwrap.dedent(
        f"""
        import sys
        from dataclasses import replace
        from medlens.datasets import load_dataset
        from medlens.models import load_encoder
        from medlens.retrieval.library import ingest, subset
        enc = load_encoder("lite:{heads_file}")
        m = subset(load_dataset("isic2018"), 40)
        done = 0
        def advance(n):
            global done
            done += n
            print(done, flush=True)
        ingest(m, enc, "t_killed", batch_size=8, workers=1, advance=advance)
        print("finished", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip().isdigit() and int(line) >= 16:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "the ingest finished before it could be killed"
    assert read_library("t_killed")["collections"]  # it had started writing
    m = subset(load_dataset("isic2018"), 40)
    store = open_store()
    coll = next(iter(read_library("t_killed")["collections"]))
    partial = store.count(coll)
    assert 0 < partial < 40
    resumed = ingest(m, encoder, "t_killed", batch_size=8, workers=1)
    assert resumed.already_indexed == partial and resumed.indexed == 40 - partial
    clean = ingest(m, encoder, "t_clean", batch_size=8, workers=1)
    assert clean.indexed == 40
    coll_clean = next(iter(read_library("t_clean")["collections"]))

    def points(c: str) -> dict[str, Any]:
        return {p.id: p for p in store.scroll(c, with_vectors=True)}

    a, b = points(coll), points(coll_clean)
    assert store.count(coll) == len(a) == 40 and set(a) == set(b)
    for pid, p in a.items():
        assert p.payload == b[pid].payload
        assert np.allclose(p.vectors["image"], b[pid].vectors["image"], atol=1e-6)
    assert check_libraries(["t_killed"])[0]["stale"] is False
    for r in m.records[::10]:
        cid = opaque_id(m, r)
        q = b[next(i for i, p in b.items() if p.payload["case_id"] == cid)].vectors["image"]
        ra = search(q, encoder.fingerprint, library="t_killed", k=10)
        rb = search(q, encoder.fingerprint, library="t_clean", k=10)
        assert [(x["case_id"], x["similarity"]) for x in ra] == [
            (x["case_id"], x["similarity"]) for x in rb
        ]


def test_check_reports_a_changed_dataset(encoder, data_dir, tmp_path) -> None:
    import shutil

    from medlens.retrieval import load_source

    folder = tmp_path / "clinic" / "Melanoma"
    folder.mkdir(parents=True)
    src = sorted((data_dir / "isic2018-task3-test" / "images").glob("*.jpg"))
    for p in src[:3]:
        shutil.copy(p, folder / p.name)
    m, desc = load_source(str(tmp_path / "clinic"), "dermatology")
    ingest(m, encoder, "t_check", source=desc, workers=0)
    (row,) = check_libraries(["t_check"])
    assert row["stale"] is False, row["reasons"]
    shutil.copy(src[3], folder / src[3].name)
    (row,) = check_libraries(["t_check"])
    assert row["stale"] and any("dataset" in r for r in row["reasons"])


# ----------------------------------------------------------------------------- knowledge


def test_knowledge_passages_are_traceable(encoder) -> None:
    from medlens.knowledge import load_domain

    pack = load_domain("chest_xray")
    fids = [pack.findings[0].id, pack.findings[1].id]
    got = knowledge_passages(encoder, fids, "chest_xray", k_per_finding=2)
    assert [g["finding_id"] for g in got] == [fids[0]] * 2 + [fids[1]] * 2
    for g in got:
        sections = pack.finding(g["finding_id"]).description.sections()
        assert g["text"] in sections[g["section"]]  # verbatim from the pack
        assert pack.source_hash in g["source"] and g["section"] in g["source"]
    img_q = encoder.embed_texts(["cough and fever for a week"])[0]
    by_query = knowledge_passages(encoder, fids[:1], "chest_xray", 1, query_embedding=img_q)
    assert by_query[0]["finding_id"] == fids[0]


def test_knowledge_index_is_per_encoder(encoder) -> None:
    from medlens.models.lite import LiteEncoder
    from medlens.retrieval.knowledge_index import ensure_index

    other = LiteEncoder.untrained(seed=1)
    a = ensure_index(encoder, "chest_xray")
    b = ensure_index(other, "chest_xray")
    assert a != b and other.fingerprint in b and encoder.fingerprint in a
    store = open_store()
    assert store.count(a) == store.count(b) > 0


# ----------------------------------------------------------------------------- entry points


def test_similar_cases_and_demo_library(encoder, data_dir) -> None:
    from medlens.io import load_image

    cxr = data_dir / "cxr-samples" / "00000001_000.png"
    emb = encoder.embed_images([load_image(cxr).pixels])[0]
    assert similar_cases(emb, "chest_xray", encoder.fingerprint, library="t_none") == []
    reps = build_demo_library(data_dir, encoder, limit=24, library="t_demo")
    assert {r.dataset for r in reps} == {
        "isic2018",
        "pad_ufes_20",
        "covid_chestxray",
        "cxr_samples",
    }
    got = similar_cases(emb, "chest_xray", encoder.fingerprint, k=3, library="t_demo")
    cxr_samples = load_dataset("cxr_samples")
    want = opaque_id(cxr_samples, record_of(cxr_samples, "00000001_000.png"))
    assert got[0]["case_id"] == want and len(got) == 3
    derm = similar_cases(
        emb, "dermatology", encoder.fingerprint, k=3, library="t_demo", filters=["age>=30"]
    )
    assert derm and all(r["domain"] == "dermatology" and r["age"] >= 30 for r in derm)


def test_cli_index_search_cache(encoder, heads_file, data_dir) -> None:
    import typer
    from typer.testing import CliRunner

    from medlens.cli import cache, retrieval

    app = typer.Typer()
    retrieval.register(app)
    cache.register(app)
    run = CliRunner().invoke
    model = f"lite:{heads_file}"
    # The library owner opts in to named ids: cases are shown by their file names.
    r = run(
        app,
        ["index", "cxr_samples", "--model", model, "--name", "t_cli", "--named-ids", "--json"],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["indexed"] + rep["already_indexed"] == len(load_dataset("cxr_samples").records)
    img = str(data_dir / "cxr-samples" / "tb0005.png")
    r = run(
        app, ["search", "--image", img, "--library", "t_cli", "--model", model, "-k", "2", "--json"]
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"]
    assert res[0]["case_id"] == "tb0005.png" and len(res) == 2
    assert res[0]["image_path"] and not Path(res[0]["image_path"]).is_absolute()
    assert (data_dir / "cxr-samples" / res[0]["image_path"]).samefile(img)
    r = run(
        app,
        [
            "search",
            "--text",
            "tuberculosis",
            "--library",
            "t_cli",
            "--model",
            model,
            "--filter",
            "label=tb",
            "--json",
        ],
    )
    assert r.exit_code == 0 and all("tb" in x["labels"] for x in json.loads(r.stdout)["results"])
    r = run(app, ["search", "--library", "t_cli", "--model", model])
    assert r.exit_code == 2 and "exactly one of" in r.output and "Traceback" not in r.output
    r = run(app, ["search", "--text", "x", "--filter", "age>=old", "--model", model])
    assert r.exit_code == 2 and "not a number" in r.output
    r = run(app, ["index", "no_such_thing"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    r = run(app, ["cache", "info", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["entries"] > 0
    r = run(app, ["index", "--check", "--name", "t_cli", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["libraries"][0]["stale"] is False


# ----------------------------------------------------------------------------- identifiers


def _absolute_paths(obj: Any, roots: list[str]) -> list[str]:
    """Every string in a response that is (or contains) an absolute filesystem path."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _absolute_paths(v, roots)]
    if isinstance(obj, list | tuple):
        return [x for v in obj for x in _absolute_paths(v, roots)]
    if isinstance(obj, str) and (obj.startswith(("/", "~")) or any(r in obj for r in roots)):
        return [obj]
    return []


def test_case_ids_are_opaque_and_no_response_holds_a_path(encoder, mixed, data_dir) -> None:
    """Issue 13: case ids were file names and came with absolute thumbnail paths. By
    default the index holds neither record ids nor file names nor any path, and no
    response (search, similar cases, /v1/cases' service) shows a path."""
    from medlens.config import get_settings
    from medlens.io import load_image
    from medlens.retrieval.service import LibraryCaseSearch

    for m in mixed:
        ingest(m, encoder, "t_idem", workers=1)
    store = open_store()
    payloads = [p.payload for c in read_library("t_idem")["collections"] for p in store.scroll(c)]
    roots = [str(data_dir.resolve()), str(data_dir), str(get_settings().home)]
    assert not _absolute_paths(payloads, roots)
    names = set()
    for m in mixed:
        for r in m.records:
            names.add(str(r.id))
            if r.path is not None:
                names |= {r.path.name, r.path.stem}
    dumped = json.dumps(payloads)
    leaked = sorted(n for n in names if len(n) >= 6 and n in dumped)
    assert not leaked, leaked[:5]
    assert all(re.fullmatch(r"[0-9a-f]{16}", p["case_id"]) for p in payloads)
    assert len({p["case_id"] for p in payloads}) == len(payloads)
    assert all(p.get("image_path") is None for p in payloads)

    isic = mixed[0]
    emb = encoder.embed_images([load_image(isic.records[0].path).pixels])[0]
    fp = encoder.fingerprint
    rows = similar_cases(emb, "dermatology", fp, k=5, library="t_idem")
    rows += search(emb, fp, library="t_idem", k=20)
    svc = LibraryCaseSearch(fp, "t_idem")
    hits = list(svc.search(emb, k=5, domain="dermatology"))
    cases = [svc.get_case(h["id"]) for h in hits]
    assert rows and hits and all(cases)
    assert not _absolute_paths([rows, hits, cases], roots)
    assert rows[0]["case_id"] == opaque_id(isic, isic.records[0])
    data, media = svc.thumbnail(hits[0]["id"])  # the file is found server-side
    assert media == "image/jpeg" and data[:2] == b"\xff\xd8"


def test_named_ids_are_an_opt_in_and_switching_rewrites(encoder, data_dir, monkeypatch) -> None:
    isic = subset(load_dataset("isic2018"), 4)
    monkeypatch.setenv("MEDLENS_LIBRARY_NAMED_IDS", "1")
    assert ingest(isic, encoder, "t_named", workers=0).indexed == 4
    store = open_store()
    (coll,) = read_library("t_named")["collections"]
    got = {p.payload["case_id"]: p.payload for p in store.scroll(coll)}
    assert set(got) == {str(r.id) for r in isic.records}
    for r in isic.records:
        rel = got[str(r.id)]["image_path"]
        assert not Path(rel).is_absolute() and (isic.root / rel).samefile(r.path)
    # The owner opts out again: the points are rewritten with opaque ids, no names left.
    monkeypatch.delenv("MEDLENS_LIBRARY_NAMED_IDS")
    again = ingest(isic, encoder, "t_named", workers=0)
    assert again.indexed == 4 and again.image_forward == 0  # payloads only, cache warm
    after = [p.payload for p in store.scroll(coll)]
    assert {p["case_id"] for p in after} == {opaque_id(isic, r) for r in isic.records}
    assert all(p.get("image_path") is None for p in after)


def test_libraries_from_before_show_no_absolute_paths(encoder, data_dir) -> None:
    """A point written before this change (absolute thumbnail and image paths) is shown
    with the thumbnail's relative name and no image path."""
    from medlens.retrieval.library import build_payload, collection_name, thumbnail_path

    isic = subset(load_dataset("isic2018"), 1)
    (rec,) = isic.records
    ingest(isic, encoder, "t_legacy", workers=0)
    store = open_store()
    coll = collection_name("t_legacy", "dermatology", encoder.fingerprint)
    (point,) = list(store.scroll(coll, with_vectors=True))
    h = record_hash(isic, rec)
    legacy = build_payload(isic, rec, h, True, named_ids=True)
    legacy.update(thumbnail=str(thumbnail_path(h)), image_path=str(rec.path.resolve()))
    store.upsert(coll, [PointData(point.id, point.vectors, legacy)])
    (row,) = search(point.vectors["image"], encoder.fingerprint, library="t_legacy", k=1)
    assert row["thumbnail"] == f"{h[:2]}/{h}.jpg" and row["image_path"] is None
    assert resolve_thumbnail(row["thumbnail"]) == thumbnail_path(h)


def test_cli_indexes_a_dataset_folder_path(
    encoder, heads_file, data_dir, monkeypatch, tmp_path
) -> None:
    """Issue 13: ``medlens index ../shared/data/isic2018-task3-test`` (a folder path, as
    the docs promise) failed with "no ... GroundTruth.csv ... in <data root>". A folder
    path works, relative or absolute, and so does a folder name under MEDLENS_DATA."""
    import typer
    from typer.testing import CliRunner

    from medlens.cli import retrieval as cli

    app = typer.Typer()
    cli.register(app)
    model = f"lite:{heads_file}"
    folder = data_dir / "isic2018-task3-test"
    monkeypatch.chdir(tmp_path)  # elsewhere: a path like ../shared/data/...
    forms = [os.path.relpath(folder), str(folder.resolve()), "isic2018-task3-test"]
    assert forms[0].startswith("..") and not (tmp_path / forms[2]).exists()
    seen = []
    for form in forms:
        args = ["index", form, "--model", model, "--name", "t_folder", "--limit", "3"]
        r = CliRunner().invoke(app, [*args, "--json"])
        assert r.exit_code == 0, (form, r.output)
        rep = json.loads(r.stdout.strip().splitlines()[-1])
        assert rep["dataset"] == "isic2018" and rep["domain"] == "dermatology"
        seen.append(rep["indexed"] + rep["already_indexed"])
    assert seen == [3, 3, 3]
    (row,) = check_libraries(["t_folder"])
    assert row["stale"] is False, row["reasons"]
