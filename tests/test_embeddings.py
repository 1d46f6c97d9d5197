"""The one embedding cache (``medlens.embeddings``) with the real lite encoder (pretrained
towers, deterministic untrained heads) on the real sample data: hits and misses, what a
key is made of, exactness against uncached computation, concurrent and killed writers,
maintenance, and that no text, path or identifier ever reaches the database file."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medlens import embeddings
from medlens.analysis import zeroshot
from medlens.datasets import load_dataset
from medlens.datasets.manifest import sha256_file
from medlens.embeddings import FillStats, Space, Store
from medlens.models.base import ensemble


@pytest.fixture(scope="module")
def lite() -> Any:
    from medlens.models.lite import LiteEncoder

    return LiteEncoder.untrained(seed=0)


@pytest.fixture(scope="module")
def pneumonia() -> tuple[Any, list]:
    """66 array-backed records: more than one fill batch of 64."""
    m = load_dataset("pneumoniamnist")
    return m, [r for r in m.records if r.split == "test"][:66]


@pytest.fixture(scope="module")
def pad() -> tuple[Any, list]:
    """PAD-UFES-20 records: image files, symptom sentences and patient ids."""
    m = load_dataset("pad_ufes_20")
    recs = [r for r in m.records if r.text and r.group][:6]
    assert len(recs) == 6
    return m, recs


def _vec(x: float, n: int = 8) -> np.ndarray:
    return np.full(n, x, np.float32)


# -- the store -------------------------------------------------------------------------------
def test_store_key_parts_roundtrip_info_and_prune(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite3")
    a = Space("fpA", "image", "plain", "p1", "model a")
    v = {f"k{i}": _vec(i) for i in range(5)}
    assert store.put_many(v, a) == 5
    got = store.get_many([*v, "missing"], a)
    assert set(got) == set(v) and all(np.array_equal(got[k], v[k]) for k in v)
    assert all(g.dtype == np.float32 for g in got.values())
    # Every part of the key matters: another model, kind, view or preprocessing misses.
    for other in (
        Space("fpB", "image", "plain", "p1"),
        Space("fpA", "features", "plain", "p1"),
        Space("fpA", "text", "plain", "p1"),
        Space("fpA", "image", "flip-horizontal", "p1"),
        Space("fpA", "image", "plain", "p2"),
    ):
        assert store.get_many(list(v), other) == {}, other
    store.put_many({"k0": _vec(9)}, Space("fpB", "image", "plain", "p1"))
    store.put_many({"k0": _vec(7)}, Space("fpA", "image", "flip-horizontal", "p1"))
    store.put_many({"bad": np.array([1.0, np.nan], np.float32)}, a)  # never stored
    info = store.info()
    assert info["entries"] == 7 and info["bytes"] > 0
    groups = {(g["model"], g["kind"], g["view"]): g for g in info["groups"]}
    assert groups[("fpA", "image", "plain")]["entries"] == 5
    assert groups[("fpA", "image", "plain")]["name"] == "model a"
    assert groups[("fpA", "image", "plain")]["vector_bytes"] == 5 * 8 * 4
    assert groups[("fpA", "image", "flip-horizontal")]["entries"] == 1
    # prune: no criterion deletes nothing; criteria combine; module-level functions.
    assert store.prune() == 0
    assert store.prune(older_than=1) == 0  # everything is younger than a day
    assert store.prune(model="fpB") == 1
    assert embeddings.prune(tmp_path, keep_fingerprints=["fpA"]) == 0  # other file
    assert store.prune(keep_fingerprints=["fpB"], kind="text") == 0
    assert store.prune(keep_fingerprints=["fpZ"], older_than=-1) == 6  # "older than now"
    assert store.info()["entries"] == 0 and store.info()["groups"] == []
    store.put_many(v, a)
    assert store.prune(everything=True) == 5


def test_module_info_prune_and_legacy_folders(tmp_path: Path) -> None:
    # The former per-kind folders name the one database in their parent.
    for sub in ("prompts", "features", "embeddings"):
        assert embeddings.open_store(tmp_path / sub).path == tmp_path / embeddings.DB_NAME
    store = embeddings.open_store(tmp_path)
    store.put_many({"a": _vec(1), "b": _vec(2)}, Space("m1", "text", "text", "p", "enc"))
    store.put_many({"a": _vec(1)}, Space("m2", "features", "plain", "p", "enc features"))
    info = embeddings.info(tmp_path)
    assert info["path"] == str(tmp_path / embeddings.DB_NAME) and info["entries"] == 3
    assert {(g["model"], g["kind"], g["entries"]) for g in info["groups"]} == {
        ("m1", "text", 2),
        ("m2", "features", 1),
    }
    assert embeddings.prune(tmp_path, keep_fingerprints=["m1"]) == 1
    assert embeddings.prune(tmp_path, model=["m1", "m2"]) == 2
    assert embeddings.info(tmp_path)["entries"] == 0


def test_bad_rows_are_never_returned(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite3")
    sp = Space("fp", "image", "plain", "p")
    store.put_many({"good": _vec(1)}, sp)
    con = sqlite3.connect(store.path)
    cols = "(key, model, kind, view, prep, dim, vec, created, sum) VALUES (?,?,?,?,?,?,?,?,?)"
    short, nan = _vec(1)[:5].tobytes(), _vec(np.nan).tobytes()
    with con:  # a truncated vector and a non-finite one, written behind the store's back
        # with checksums that match, so only the length and finiteness checks stop them
        con.execute(
            f"INSERT INTO vectors {cols}",
            ("short", "fp", "image", "plain", "p", 8, short, 0.0,
             embeddings.row_checksum("short", sp, 8, short)),
        )  # fmt: skip
        con.execute(
            f"INSERT INTO vectors {cols}",
            ("nan", "fp", "image", "plain", "p", 8, nan, 0.0,
             embeddings.row_checksum("nan", sp, 8, nan)),
        )  # fmt: skip
    con.close()
    assert set(store.get_many(["good", "short", "nan"], sp)) == {"good"}


@pytest.mark.parametrize("attack", ["rotate", "flip_bit", "truncate", "wrong_view"])
def test_corrupt_rows_fail_their_checksum_and_heal_on_fill(tmp_path: Path, attack: str) -> None:
    """The attacks of issue 13: rows rotated between keys (a skin photo scored with
    another text's vector), a flipped bit, a truncated blob, a row moved to another
    view. Each reads as a miss, ``fill`` recomputes it and the next read verifies."""
    store = Store(tmp_path / "c.sqlite3")
    sp = Space("fp", "text", "text", "p")
    keys = [f"k{i}" for i in range(4)]
    truth = {k: _vec(float(i + 1)) for i, k in enumerate(keys)}
    store.put_many(truth, sp)
    con = sqlite3.connect(store.path)
    with con:
        rows = con.execute("SELECT key, vec FROM vectors ORDER BY key").fetchall()
        if attack == "rotate":
            for (key, _), (_, vec) in zip(rows, rows[1:] + rows[:1], strict=True):
                con.execute("UPDATE vectors SET vec=? WHERE key=?", (vec, key))
        elif attack == "flip_bit":
            blob = bytearray(rows[0][1])
            blob[3] ^= 0x80  # the sign bit of the first float
            con.execute("UPDATE vectors SET vec=? WHERE key=?", (bytes(blob), rows[0][0]))
        elif attack == "truncate":
            con.execute("UPDATE vectors SET vec=? WHERE key=?", (rows[0][1][:16], rows[0][0]))
        else:
            con.execute("UPDATE vectors SET view='plain', kind='image' WHERE key=?", (rows[0][0],))
            con.execute(
                "UPDATE vectors SET view='text', kind='text' WHERE key=?", (rows[0][0],)
            )  # moved and back again is fine: only a row copied into another space fails
            con.execute(
                "INSERT INTO vectors SELECT key, model, 'image', 'plain', prep, dim, vec, "
                "created, sum FROM vectors WHERE key=?",
                (rows[0][0],),
            )
    con.close()
    if attack == "wrong_view":
        moved = Space("fp", "image", "plain", "p")
        assert store.get_many(keys[:1], moved) == {}
        assert store.rejected == 1
        return
    got = store.get_many(keys, sp)
    assert all(np.array_equal(got[k], truth[k]) for k in got)
    assert len(got) < len(keys) and store.rejected == len(keys) - len(got)
    calls: list[list[str]] = []

    def compute(batch: list[str]) -> np.ndarray:
        calls.append(list(batch))
        return np.stack([truth[k] for k in batch])

    healed = embeddings.fill(keys, keys, sp, compute, store=store)
    assert np.array_equal(healed, np.stack([truth[k] for k in keys]))
    assert sorted(k for b in calls for k in b) == sorted(set(keys) - set(got))
    before = store.rejected
    again = store.get_many(keys, sp)  # healed: every row verifies now
    assert len(again) == len(keys) and store.rejected == before


def test_migrates_the_old_retrieval_cache_table(tmp_path: Path) -> None:
    db = tmp_path / embeddings.DB_NAME
    con = sqlite3.connect(db)
    with con:
        con.executescript(
            "CREATE TABLE embeddings (key TEXT NOT NULL, model TEXT NOT NULL, prep TEXT NOT "
            "NULL, kind TEXT NOT NULL, dim INTEGER NOT NULL, vec BLOB NOT NULL, created REAL "
            "NOT NULL, PRIMARY KEY (key, model, prep, kind)) WITHOUT ROWID;"
            "CREATE TABLE models (model TEXT PRIMARY KEY, name TEXT, dim INTEGER, first_seen "
            "REAL);"
        )
        con.execute(
            "INSERT INTO embeddings VALUES ('h1','fp','p','image',8,?,1.0)", (_vec(3).tobytes(),)
        )
        con.execute(
            "INSERT INTO embeddings VALUES ('t1','fp','p','text',8,?,1.0)", (_vec(4).tobytes(),)
        )
        con.execute("INSERT INTO models VALUES ('fp','lite',8,1.0)")
    con.close()
    store = Store(db)
    assert store.info()["entries"] == 2 and store.info()["groups"][0]["name"] == "lite"
    # Rows from before checksums are not trusted unchecked: they read as misses (and
    # are recomputed and stamped by the next fill).
    assert store.get_many(["h1"], Space("fp", "image", "plain", "p")) == {}
    assert store.get_many(["t1"], Space("fp", "text", "text", "p")) == {}
    assert store.rejected == 2
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert "embeddings" not in tables


# -- the fill loop -----------------------------------------------------------------------------
def test_fill_prepares_the_next_batch_while_this_one_computes(tmp_path: Path, lite: Any) -> None:
    """``prepare`` (decoding, for images) runs one batch ahead in a background thread:
    results equal the plain loop's, in order, and a failure names its own batch."""
    import threading

    texts = [f"finding number {i} on a chest radiograph" for i in range(10)]
    keys = [embeddings.text_key(t) for t in texts]
    space = embeddings.text_space(lite)
    prepared_in: list[str] = []
    started = threading.Event()

    def prepare(batch: list[str]) -> list[str]:
        prepared_in.append(threading.current_thread().name)
        started.set()
        return [t.upper() for t in batch]

    def compute(batch: list[str]) -> np.ndarray:
        assert started.is_set() and all(t.isupper() for t in batch)
        return lite.embed_texts(batch)

    out = embeddings.fill(texts, keys, space, compute, store=None, batch_size=3, prepare=prepare)
    plain = lite.embed_texts([t.upper() for t in texts])
    np.testing.assert_allclose(out, plain, atol=1e-6)
    assert len(prepared_in) == 4 and prepared_in[1].startswith("medlens-prepare")

    def broken(batch: list[str]) -> list[str]:
        if "finding number 7 on a chest radiograph" in batch:
            raise ValueError("cannot decode item 7")
        return batch

    store = Store(tmp_path / "c.sqlite3")
    with pytest.raises(ValueError, match="item 7"):
        embeddings.fill(
            texts, keys, space, lite.embed_texts, store=store, batch_size=3, prepare=broken
        )
    assert len(store.get_many(keys, space)) == 6  # the batches before it are kept


def test_fill_hits_misses_batches_and_progress(tmp_path: Path, lite: Any) -> None:
    store = Store(tmp_path / "c.sqlite3")
    texts = [f"a chest x-ray with finding number {i}" for i in range(10)]
    calls: list[int] = []

    def compute(batch: list[str]) -> np.ndarray:
        calls.append(len(batch))
        return lite.embed_texts(batch)

    def run(items: list[str], **kw: Any) -> tuple[np.ndarray, list[int], FillStats]:
        calls.clear()
        seen: list[int] = []
        stats = FillStats()
        out = embeddings.fill(
            items,
            [embeddings.text_key(t) for t in items],
            embeddings.text_space(lite),
            compute,
            store=store,
            progress=seen.append,
            stats=stats,
            **kw,
        )
        return out, seen, stats

    cold, seen, stats = run(texts, batch_size=4)
    assert calls == [4, 4, 2] and sum(seen) == 10 and (stats.hits, stats.computed) == (0, 10)
    assert cold.dtype == np.float32 and cold.shape == (10, lite.dim)
    warm, seen, stats = run(texts, batch_size=4)
    assert calls == [] and seen == [10] and (stats.hits, stats.computed) == (10, 0)
    assert np.array_equal(warm, cold)
    # One new text: only it goes through the model; a repeated miss is computed once.
    more = [*texts[:3], "a new sentence", texts[5], "a new sentence"]
    out, seen, stats = run(more, unique=True)
    assert calls == [1] and sum(seen) == len(more) and stats.hits == 4
    assert np.array_equal(out[[0, 1, 2, 4]], cold[[0, 1, 2, 5]])
    assert np.array_equal(out[3], out[5])
    np.testing.assert_allclose(out[3], lite.embed_texts(["a new sentence"])[0], atol=1e-6)
    # Without a store nothing is kept; the numbers are those of the cached run.
    calls.clear()
    nostore = embeddings.fill(
        texts,
        [embeddings.text_key(t) for t in texts],
        embeddings.text_space(lite),
        compute,
        store=None,
        batch_size=4,
    )
    assert calls == [4, 4, 2] and np.array_equal(nostore, cold)
    empty = embeddings.embed_texts(lite, [], store=store)
    assert empty.shape == (0, lite.dim)


def test_cached_record_embeddings_are_exactly_the_uncached_ones(
    tmp_path: Path, lite: Any, pneumonia: tuple
) -> None:
    """A cold and a warm cache return bit-for-bit what an uncached run computes (the same
    batches), so evaluation figures do not depend on the cache."""
    m, recs = pneumonia
    store = Store(tmp_path / "c.sqlite3")
    plain = embeddings.embed_records(lite, m, recs, store=None)
    cold = embeddings.embed_records(lite, m, recs, store=store)
    warm = embeddings.embed_records(lite, m, recs, store=store)
    assert np.array_equal(plain, cold) and np.array_equal(plain, warm)
    assert plain.dtype == np.float32 and plain.shape == (len(recs), lite.dim)
    direct = lite.embed_images([m.image(r) for r in recs[:8]], batch_size=32)
    np.testing.assert_allclose(plain[:8], direct, atol=1e-5)
    # Lite caches backbone features (per backbone), one row per image and view.
    groups = {(g["model"], g["kind"], g["view"]): g["entries"] for g in store.info()["groups"]}
    assert groups == {(lite.backbone_fingerprint, "features", "plain"): len(recs)}


def test_key_includes_fingerprint_and_view(tmp_path: Path, lite: Any, pneumonia: tuple) -> None:
    from medlens.models.lite import LiteEncoder

    m, recs = pneumonia
    recs = recs[:12]
    store = Store(tmp_path / "c.sqlite3")
    keys = [embeddings.record_key(m, r) for r in recs]
    plain = embeddings.embed_records(lite, m, recs, store=store)
    # A flip is another view: it misses, is computed and stored beside the plain one.
    flipped = embeddings.embed_records(lite, m, recs, store=store, flip="horizontal")
    assert not np.allclose(flipped, plain)
    fs = embeddings.features_space(lite, "flip-horizontal")
    assert set(store.get_many(keys, fs)) == set(keys)
    assert store.get_many(keys, embeddings.features_space(lite, "flip-vertical")) == {}
    # Other heads on the same backbone: features hit (no new rows), embeddings differ.
    other = LiteEncoder.untrained(seed=1)
    assert other.fingerprint != lite.fingerprint
    assert other.features_key == lite.features_key
    before = store.info()["entries"]
    emb_other = embeddings.embed_records(other, m, recs, store=store)
    assert store.info()["entries"] == before and not np.allclose(emb_other, plain)
    # Final embeddings are keyed by the full fingerprint: another model misses.
    ims = embeddings.image_space(lite)
    store.put_many(dict(zip(keys, plain, strict=True)), ims)
    assert set(store.get_many(keys, ims)) == set(keys)
    assert store.get_many(keys, embeddings.image_space(other)) == {}
    assert store.get_many(keys, embeddings.image_space(lite, "flip-horizontal")) == {}


def test_record_keys_are_content_hashes(pad: tuple, pneumonia: tuple) -> None:
    m, recs = pad
    r = recs[0]
    assert embeddings.record_key(m, r) == sha256_file(r.path) == embeddings.file_key(r.path)
    pm, precs = pneumonia
    a, b = (embeddings.record_key(pm, x) for x in precs[:2])
    assert len(a) == 64 and a != b


def test_prompt_sets_memo_and_store(tmp_path: Path, lite: Any) -> None:
    sets = [["a photo of a mole", "a benign naevus"], ["a melanoma", "malignant melanoma"]]
    flat = [t for s in sets for t in s]
    emb = lite.embed_texts(flat)
    expected = np.stack([ensemble(emb[:2]), ensemble(emb[2:])])
    embeddings.clear_memo()
    first = zeroshot.embed_prompt_sets(lite, sets, tmp_path / "prompts")
    assert np.array_equal(first, expected)
    # The memo answers repeated calls (the same array, no SQLite, no model).
    assert zeroshot.embed_prompt_sets(lite, sets, tmp_path / "prompts") is first
    # Each prompt's vector is in the one database, keyed by the text's hash.
    store = embeddings.open_store(tmp_path)
    keys = [embeddings.text_key(t) for t in flat]
    assert set(store.get_many(keys, embeddings.text_space(lite))) == set(keys)
    embeddings.clear_memo()
    again = zeroshot.embed_prompt_sets(lite, sets, tmp_path)
    assert again is not first and np.array_equal(again, expected)
    # No cache_dir: computed in process only, equal all the same.
    embeddings.clear_memo()
    assert np.array_equal(zeroshot.embed_prompt_sets(lite, sets), expected)


# -- privacy ------------------------------------------------------------------------------------
def test_no_text_path_or_identifier_reaches_the_database(
    tmp_path: Path, lite: Any, pad: tuple
) -> None:
    m, recs = pad
    cache = tmp_path / "cache"
    store = embeddings.open_store(cache)
    embeddings.embed_records(lite, m, recs, store=store)
    embeddings.embed_records(lite, m, recs, store=store, flip="vertical")
    texts = [r.text for r in recs]
    embeddings.embed_texts(lite, texts, store=store)
    prompts = [["a lesion on the forearm of a patient"]]
    zeroshot.embed_prompt_sets(lite, prompts, cache)
    assert store.info()["entries"] == 2 * len(recs) + len(set(texts)) + 1
    store.close()
    data = b"".join(p.read_bytes() for p in cache.iterdir() if p.is_file())
    assert data
    secrets = [*texts, prompts[0][0], str(m.root)]
    for r in recs:
        secrets += [str(r.path), r.path.name, r.path.stem, r.id, r.group]
    for s in secrets:
        assert len(s) >= 6 and s.encode("utf-8") not in data, s
        assert s.encode("utf-16-le") not in data, s


# -- concurrency ------------------------------------------------------------------------------
_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from medlens.embeddings import Space, Store
    store = Store(sys.argv[1]); value = float(sys.argv[2]); n = int(sys.argv[3])
    space = Space("fp", "image", "plain", "p", "writer")
    print("ready", flush=True)
    for i in range(n):  # one transaction of 50 rows per i
        store.put_many({f"k-{i}-{j}": np.full(64, value + i, np.float32)
                        for j in range(50)}, space)
    print("done", flush=True)
    """
)


def _writer(db: Path, value: float, n: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db), str(value), str(n)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _rows(db: Path) -> list[tuple[str, bytes]]:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return con.execute("SELECT key, vec FROM vectors").fetchall()
    finally:
        con.close()


def test_concurrent_writers_of_the_same_keys(tmp_path: Path) -> None:
    """Two processes writing the same keys at once: no error, and every row is one
    writer's whole vector (never a mix, never torn)."""
    db = tmp_path / "shared.sqlite3"
    Store(db)
    procs = [_writer(db, v, 40) for v in (1000.0, 2000.0)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    rows = _rows(db)
    assert len(rows) == 40 * 50
    for key, blob in rows:
        vec = np.frombuffer(blob, "<f4")
        i = int(key.split("-")[1])
        assert vec.size == 64 and np.all(vec == vec[0]) and vec[0] in (1000.0 + i, 2000.0 + i)


def test_killed_writer_leaves_only_whole_transactions(tmp_path: Path) -> None:
    db = tmp_path / "killed.sqlite3"
    store = Store(db)
    victim = _writer(db, 5000.0, 1_000_000)
    assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while store.info()["entries"] < 500 and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rows = _rows(db)
    assert rows and len(rows) % 50 == 0  # whole transactions only
    for key, blob in rows:
        vec = np.frombuffer(blob, "<f4")
        assert vec.size == 64 and np.all(vec == 5000.0 + int(key.split("-")[1]))
    # The database stays usable for the next writer.
    sp = Space("fp", "image", "plain", "p")
    assert Store(db).put_many({"after": _vec(1, 64)}, sp) == 1
    assert "after" in store.get_many(["after"], sp)


# -- training and evaluation share the features ------------------------------------------------
def test_heads_only_training_fills_and_reuses_backbone_features(tmp_path: Path) -> None:
    """``train align`` (heads-only recipe) caches backbone features in the one database
    (under the legacy ``cache/features`` folder name too); a second run computes none,
    and evaluation reads the same rows for a model with those towers."""
    from medlens.models.lite import LiteEncoder
    from medlens.training.align import AlignConfig, train_align

    cfg = AlignConfig(data=("pneumoniamnist",), epochs=1, batch_size=16, limit=12, image_size=64)
    cache = tmp_path / "cache" / "features"
    first = train_align(cfg, tmp_path / "run1", cache)
    info = embeddings.info(cache)
    assert info["path"] == str(tmp_path / "cache" / embeddings.DB_NAME)
    enc = LiteEncoder.untrained(image_size=64)
    assert [(g["model"], g["kind"], g["entries"]) for g in info["groups"]] == [
        (enc.backbone_fingerprint, "features", 24)  # 12 train + 12 val images
    ]
    second = train_align(cfg, tmp_path / "run2", cache)
    assert embeddings.info(cache)["entries"] == 24
    assert first["val"] == second["val"]
    m = load_dataset("pneumoniamnist")
    val = [r for r in m.records if r.split == "val"][:12]
    keys = [embeddings.record_key(m, r) for r in val]
    store = embeddings.open_store(cache)
    assert set(store.get_many(keys, embeddings.features_space(enc))) == set(keys)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_database_is_moved_aside_and_the_cache_heals(tmp_path: Path, damage: str) -> None:
    db = tmp_path / embeddings.DB_NAME
    sp = Space("fp", "image", "plain", "p")
    store = Store(db)
    store.put_many({f"k{i}": _vec(float(i), 64) for i in range(3000)}, sp)
    store.close()
    raw = db.read_bytes()
    if damage == "truncate":
        db.write_bytes(raw[: len(raw) // 2])
    else:
        db.write_bytes(raw[:100] + b"\x5a" * (len(raw) - 100))
    for extra in ("-wal", "-shm"):
        Path(str(db) + extra).unlink(missing_ok=True)
    fresh = Store(db)
    got = fresh.get_many([f"k{i}" for i in range(3000)], sp)  # never a traceback
    assert all(np.array_equal(v, _vec(float(int(k[1:])), 64)) for k, v in got.items())
    vec = embeddings.fill(["x"], ["x"], sp, lambda b: np.stack([_vec(7.0, 64)]), store=fresh)
    assert np.array_equal(vec[0], _vec(7.0, 64)) and "x" in fresh.get_many(["x"], sp)
    if len(got) < 3000:
        assert fresh.quarantined and fresh.quarantined[0].exists()


def test_the_cache_database_is_private(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache" / "c.sqlite3")
    store.put_many({"k": _vec(1.0)}, Space("fp", "image", "plain", "p"))
    assert (store.path.parent.stat().st_mode & 0o777) == 0o700
    for p in store.path.parent.iterdir():
        assert (p.stat().st_mode & 0o777) == 0o600, p
