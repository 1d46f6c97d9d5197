"""Vector search: latency p50/p95 and recall@10 against exact search, per index setting.

Builds a collection of N vectors of the model's dimension (256 for lite) through
``medlens.retrieval.store`` (the embedded qdrant-edge default, or a Qdrant server with
``--qdrant-url``/MEDLENS_QDRANT_URL as a sharded, replicated collection), with the
payload a case library has (labels, age, domain, split) and payload indexes, then times
filtered and unfiltered top-10 queries and checks them against exact numpy search.

Two vector sets (``--vectors``):

- ``realistic``: real lite embeddings of the sample images (train splits of HAM10000,
  PAD-UFES-20, DermNet, COVID-19 chest X-rays and PneumoniaMNIST, through the embedding
  cache) grown to N points that keep their cluster structure: each point lies between a
  real embedding and one of its 10 nearest real neighbours (a uniform fraction ≤ 0.5 of
  the way) plus isotropic noise of a quarter of the median nearest-neighbour distance,
  re-normalised, and carries its parent's label. Queries are real embeddings of the
  *test* splits (never parents), filtered by their own label and an age bound.
- ``isotropic``: the earlier synthetic set, 64 Gaussian clusters whose within-cluster
  spread exceeds the distance between centres, i.e. close to uniform on the sphere (a
  needlessly hard case for HNSW, kept for comparison with earlier runs).

Index settings (``--settings``): ``legacy`` (``store.LEGACY_INDEX``: HNSW m 16,
ef_construct 128, search ef 256, float32), ``default`` (``store.DEFAULT_INDEX``, what
MedLens ships), ``int8`` (``store.INT8_INDEX``) or ``custom`` built from
``--m/--ef-construct/--search-ef/--quant/--oversampling`` (or ``custom:k=v;k=v``).

    python benchmarks/vector_search.py --sizes 10000,100000 --out results/vector_search.json
    python benchmarks/vector_search.py --sizes 1000000 --vectors realistic,isotropic \
        --settings legacy,default --out benchmarks/results/vector_search_1m.json
    python benchmarks/vector_search.py --sizes 200000 --settings custom --quant int8 --m 32
    python benchmarks/vector_search.py --sizes 10000 --client-local   # qdrant-client local mode

Speed goals are reported here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from medlens.retrieval.store import (
    DEFAULT_INDEX,
    INT8_INDEX,
    LEGACY_INDEX,
    Condition,
    EdgeStore,
    IndexSettings,
    PointData,
    ServerStore,
)

LABELS = ("nv", "mel", "bkl", "bcc", "akiec", "vasc", "df")
LABEL_P = np.array([0.6, 0.11, 0.11, 0.06, 0.04, 0.04, 0.04])


@dataclasses.dataclass
class VectorSet:
    """Points (unit rows) with label ids into ``names``, ages, and queries with theirs."""

    vecs: np.ndarray
    labels: np.ndarray
    age: np.ndarray
    names: tuple[str, ...]
    queries: np.ndarray
    query_labels: np.ndarray
    source: str
    query_source: str = "synthetic"
    truth: dict = dataclasses.field(default_factory=dict)  # exact top-k, filled on first use


def isotropic(n: int, dim: int, n_queries: int) -> VectorSet:
    vecs, labels, age, centers, _ = make_data(n, dim)
    rng = np.random.default_rng(2)
    qlab = rng.integers(0, 3, size=n_queries)  # nv, mel, bkl: 60 %, 11 %, 11 % of points
    return VectorSet(vecs, labels, age, LABELS, queries(centers, n_queries), qlab, "isotropic")


# Where the realistic set's real embeddings come from: (dataset, options), parents from
# the train split, queries from the test split.
REAL_SOURCES = (
    ("ham10000", {}),
    ("pad_ufes_20", {}),
    ("dermnet", {}),
    ("covid_chestxray", {}),
    ("pneumoniamnist", {}),
)


def _real(split: str, per_source: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Lite embeddings of up to ``per_source`` records of ``split`` per source (cached)."""
    from medlens.datasets import load_dataset
    from medlens.evaluation.protocols import embed_records
    from medlens.models import load_encoder

    enc = load_encoder("lite")
    rng = np.random.default_rng(seed)
    vecs, labels = [], []
    for name, opts in REAL_SOURCES:
        man = load_dataset(name, **opts)
        recs = [r for r in man.records if r.split == split and r.labels]
        recs = [recs[i] for i in sorted(rng.permutation(len(recs))[:per_source])]
        print(f"embedding {len(recs)} {name} {split} images (cached after the first run)")
        vecs.append(embed_records(enc, man, recs))
        labels += [f"{name}:{r.labels[0]}" for r in recs]
    return np.concatenate(vecs).astype(np.float32), labels


def realistic(
    n: int,
    n_queries: int,
    per_source: int = 3000,
    seed: int = 0,
    query_splits: tuple[str, ...] = ("test",),
) -> list[VectorSet]:
    """Real embeddings grown to ``n`` points along their own neighbourhoods (module doc);
    one VectorSet per query split, sharing the points (tune on ``val``, report ``test``)."""
    parents, plabels = _real("train", per_source, seed)
    per = max(1, n_queries // len(REAL_SOURCES))
    qsets = {qs: _real(qs, per, seed + 1) for qs in query_splits}
    names = tuple(sorted(set(plabels).union(*(set(q[1]) for q in qsets.values()))))
    pid = np.array([names.index(x) for x in plabels])
    # 10 nearest real neighbours of every parent (cosine on unit rows), in chunks.
    nn = np.empty((len(parents), 10), np.int64)
    nn_dist = np.empty(len(parents), np.float32)
    for s in range(0, len(parents), 2048):
        sim = parents[s : s + 2048] @ parents.T
        sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf
        nn[s : s + len(sim)] = np.argpartition(-sim, 10, axis=1)[:, :10]
        nn_dist[s : s + len(sim)] = np.sqrt(np.maximum(0.0, 2 - 2 * sim.max(axis=1)))
    sigma = 0.25 * float(np.median(nn_dist))
    rng = np.random.default_rng(seed)
    dim = parents.shape[1]
    out = np.empty((n, dim), np.float32)
    which = rng.integers(0, len(parents), size=n)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        p = which[s:e]
        q = nn[p, rng.integers(0, 10, size=e - s)]
        lam = rng.uniform(0, 0.5, size=(e - s, 1)).astype(np.float32)
        noise = rng.standard_normal((e - s, dim)).astype(np.float32) * (sigma / np.sqrt(dim))
        out[s:e] = (1 - lam) * parents[p] + lam * parents[q] + noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    age = rng.uniform(18, 90, size=n).astype(np.float32)
    sets = []
    for qs, (qvecs, qlabels) in qsets.items():
        qid = np.array([names.index(x) for x in qlabels])
        keep = np.random.default_rng(seed + 2).permutation(len(qvecs))[:n_queries]
        sets.append(
            VectorSet(
                out, pid[which], age, names, qvecs[keep], qid[keep], "realistic", f"{qs} split"
            )
        )
    return sets


def make_data(n: int, dim: int, seed: int = 0, n_clusters: int = 64):
    """Clustered, normalised vectors + payload columns (labels follow clusters)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    cluster_label = rng.choice(len(LABELS), size=n_clusters, p=LABEL_P)
    which = rng.integers(0, n_clusters, size=n)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        out[s:e] = centers[which[s:e]] + 1.2 * rng.standard_normal((e - s, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    labels = cluster_label[which]
    age = rng.uniform(18, 90, size=n).astype(np.float32)
    return out, labels, age, centers, cluster_label


def queries(centers: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(centers), size=n)
    q = centers[which] + 1.2 * rng.standard_normal((n, centers.shape[1])).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def point_id(i: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"bench-{i}"))


def build(store, name: str, vs: VectorSet, batch: int = 4000) -> dict[str, float]:
    vecs, labels, age = vs.vecs, vs.labels, vs.age
    store.drop(name)
    store.create(name, {"image": vecs.shape[1]})
    t0 = time.perf_counter()
    for s in range(0, len(vecs), batch):
        pts = [
            PointData(
                point_id(i),
                {"image": vecs[i]},
                {
                    "labels": [vs.names[labels[i]]],
                    "age": float(age[i]),
                    "domain": "dermatology",
                    "split": "test" if i % 5 == 0 else "train",
                    "i": i,
                },
            )
            for i in range(s, min(len(vecs), s + batch))
        ]
        store.upsert(name, pts)
    t_upsert = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.optimize(name)
    return {"upsert_s": round(t_upsert, 1), "index_s": round(time.perf_counter() - t0, 1)}


def exact_topk(vecs, mask, q, k=10) -> np.ndarray:
    idx = np.flatnonzero(mask)
    scores = vecs[idx] @ q
    top = np.argpartition(-scores, min(k, len(idx) - 1))[:k]
    return idx[top[np.argsort(-scores[top])]]


def queries_and_truth(vs: VectorSet, filtered: bool, k: int = 10) -> list[tuple]:
    """(query, filter, exact top-k) per query, computed once per query set: the same
    truth serves every setting and beam width measured on it."""
    key = (filtered, k)
    if key not in vs.truth:
        rng = np.random.default_rng(2)
        rows = []
        for q, lab in zip(vs.queries, vs.query_labels, strict=True):
            if filtered:
                lo = float(rng.choice([40.0, 60.0]))
                conds = [Condition("labels", "eq", vs.names[lab]), Condition("age", "gte", lo)]
                mask = (vs.labels == lab) & (vs.age >= lo)
            else:
                conds, mask = [], np.ones(len(vs.vecs), bool)
            rows.append((q, conds, set(exact_topk(vs.vecs, mask, q, k).tolist())))
        vs.truth[key] = rows
    return vs.truth[key]


def measure(store, name, vs: VectorSet, filtered: bool, k: int = 10, ef=None, repeat: int = 3):
    """p50/p95 over queries of each query's median latency across ``repeat`` passes
    (with one pass, the same 1M settings' filtered p50 moved between 2.9 and 5.7 ms
    across runs), and recall@10 (from the first pass)."""
    rows = queries_and_truth(vs, filtered, k)
    for q, conds, _ in rows[:20]:  # warm-up: first touches of the mmapped index
        store.search(name, q, "image", k=k, filters=conds, ef=ef)
    lat = np.empty((repeat, len(rows)))
    recalls = []
    for r in range(repeat):
        for j, (q, conds, truth) in enumerate(rows):
            t0 = time.perf_counter()
            hits = store.search(name, q, "image", k=k, filters=conds, ef=ef)
            lat[r, j] = (time.perf_counter() - t0) * 1000
            if r == 0:
                got = {h.payload["i"] for h in hits}
                recalls.append(len(got & truth) / max(1, len(truth)))
    per_query = np.median(lat, axis=0)
    return {
        "p50_ms": round(float(np.percentile(per_query, 50)), 3),
        "p95_ms": round(float(np.percentile(per_query, 95)), 3),
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "queries": len(rows),
        "passes": repeat,
    }


def rss_gib() -> dict[str, float]:
    """Peak and current resident memory of this process (GiB; /proc where there is one)."""
    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_gib"] = round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return out


def settings_for(name: str, args: argparse.Namespace) -> IndexSettings:
    if name == "legacy":
        return LEGACY_INDEX
    if name == "default":
        return DEFAULT_INDEX
    if name == "int8":
        return INT8_INDEX
    if name.startswith("custom:"):  # e.g. custom:m=32,search_ef=128,quantization=int8
        fields = {f.name: f.type for f in dataclasses.fields(IndexSettings)}
        kv = dict(item.split("=", 1) for item in name.split(":", 1)[1].split(";") if item)
        conv = {
            "int": int,
            "float": float,
            "bool": lambda v: v == "true",
            "int | None": lambda v: int(v) if v else None,
        }
        vals = {k: conv.get(str(fields[k]), lambda v: v or None)(v) for k, v in kv.items()}
        return IndexSettings(**vals)
    if name == "custom":
        return IndexSettings(
            m=args.m,
            ef_construct=args.ef_construct,
            search_ef=args.search_ef,
            quantization=args.quant or None,
            oversampling=args.oversampling,
        )
    sys.exit(f"unknown settings {name!r}: legacy, default, custom or custom:k=v;k=v")


def _without_acorn(store, name: str, vs: VectorSet, index: IndexSettings) -> dict:
    """Filtered search on the same graph without ACORN (a search-time choice)."""
    store.index = dataclasses.replace(index, acorn=False)
    try:
        return measure(store, name, vs, filtered=True)
    finally:
        store.index = index


def graph_key(index: IndexSettings) -> tuple:
    """The build-time part of the settings: rows that differ only in search-time fields
    (ef, filtered ef, ACORN, oversampling, rescore) are measured on one built graph."""
    return (index.m, index.ef_construct, index.quantization, index.quantile)


def bench_store(args, index: IndexSettings, n: int) -> tuple[Any, str]:
    """The store the run measures, and its description for the results."""
    url = args.qdrant_url or os.environ.get("MEDLENS_QDRANT_URL")
    if url:
        store = ServerStore(
            url,
            os.environ.get("MEDLENS_QDRANT_API_KEY"),
            shards=args.shards,
            replicas=args.replicas,
            index=index,
        )
        return store, f"qdrant server ({args.shards} shards × {args.replicas} replicas)"
    if args.client_local:
        return ServerStore(path=args.workdir / f"client-{n}", index=index), (
            "qdrant-client local mode"
        )
    return EdgeStore(args.workdir, index=index), "qdrant-edge (embedded)"


def run_one(
    sets: list[VectorSet], index: IndexSettings, label: str, args, efs: list[int], built: dict
) -> dict:
    """Build one collection from ``sets[0]``'s points (or reuse the one in ``built`` with
    the same graph) and measure every query set on it (the first at the top level, the
    others under ``other_queries``)."""
    vs = sets[0]
    n, dim = vs.vecs.shape
    row: dict = {"n": n, "dim": dim, "vectors": vs.source, "settings": label}
    row["queries_from"] = vs.query_source
    row["index"] = dataclasses.asdict(index)
    store, row["backend"] = bench_store(args, index, n)
    key = graph_key(index)
    name = f"bench-{vs.source}-{n}-" + "-".join(str(x).replace(".", "_") for x in key)
    if key in built:
        row.update(built[key][0], graph_reused=True)
    else:
        built[key] = (build(store, name, vs), name)
        row.update(built[key][0])
    row.update({f"after_build_{k}": v for k, v in rss_gib().items()})
    row["filtered"] = measure(store, name, vs, filtered=True)
    row["unfiltered"] = measure(store, name, vs, filtered=False)
    row["filtered_without_acorn"] = _without_acorn(store, name, vs, index)
    row["ef_ramp"] = ramp(store, name, vs, efs)
    row["other_queries"] = {
        other.query_source: {
            "filtered": measure(store, name, other, filtered=True),
            "unfiltered": measure(store, name, other, filtered=False),
            "filtered_without_acorn": _without_acorn(store, name, other, index),
            "ef_ramp": ramp(store, name, other, efs),
        }
        for other in sets[1:]
    }
    row.update(rss_gib())
    if isinstance(store, EdgeStore):
        row["disk_mib"] = round(
            sum(p.stat().st_size for p in (args.workdir / name).rglob("*") if p.is_file()) / 2**20
        )
    store.close()
    return row


def ramp(store, name: str, vs: VectorSet, efs: list[int]) -> dict:
    """Filtered and unfiltered search at each beam width in ``efs`` (to choose the
    defaults on validation queries; other query sets are measured, never chosen on)."""
    return {
        str(ef): {
            "filtered": measure(store, name, vs, filtered=True, ef=ef),
            "unfiltered": measure(store, name, vs, filtered=False, ef=ef),
        }
        for ef in efs
    }


def table(paths: list[Path]) -> str:
    """Markdown rows for the JSON files of earlier runs (docs/retrieval.md, RESULTS)."""
    out = [
        "| vectors | n | settings | build (upsert + index) | RSS after build / peak "
        "| filtered p50 / p95 | filtered recall@10 | unfiltered p50 / p95 "
        "| unfiltered recall@10 | filtered without ACORN: p50 / recall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        for r in json.loads(path.read_text()):
            i = r["index"]
            fef = f" (filtered {i['filtered_ef']})" if i.get("filtered_ef") else ""
            st = (
                f"{r['settings']}: m {i['m']}, ef_c {i['ef_construct']}, ef {i['search_ef']}"
                f"{fef}, {i['quantization'] or 'float32'}"
            )
            measured = {r.get("queries_from", "synthetic"): r, **r.get("other_queries", {})}
            for queries, m in measured.items():
                f, u, na = m["filtered"], m["unfiltered"], m.get("filtered_without_acorn")
                no_acorn = f"{na['p50_ms']} ms / {na['recall_at_10']}" if na else "–"
                out.append(
                    f"| {r['vectors']} ({queries} queries) | {r['n']:,} | {st} "
                    f"| {r['upsert_s']} s + {r['index_s']} s "
                    f"| {r.get('after_build_rss_gib', '–')} / {r['peak_rss_gib']} GiB "
                    f"| {f['p50_ms']} / {f['p95_ms']} ms | {f['recall_at_10']} "
                    f"| {u['p50_ms']} / {u['p95_ms']} ms | {u['recall_at_10']} | {no_acorn} |"
                )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--dim", type=int, default=256, help="isotropic set only")
    ap.add_argument("--vectors", default="isotropic", help="realistic and/or isotropic")
    ap.add_argument(
        "--settings",
        default="default",
        help="comma-separated: legacy, default, int8, custom (the flags below) or "
        "custom:m=32;search_ef=128;quantization=int8 (IndexSettings fields)",
    )
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construct", type=int, default=128)
    ap.add_argument("--search-ef", type=int, default=256)
    ap.add_argument("--quant", default="", help="'' (float32) or int8")
    ap.add_argument("--oversampling", type=float, default=2.0)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--per-source", type=int, default=3000, help="real parents per dataset")
    ap.add_argument(
        "--query-split",
        default="test",
        help="realistic queries: val to tune, test to report; val,test measures both on one build",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/medlens-vector-bench"))
    ap.add_argument("--client-local", action="store_true", help="measure qdrant-client local mode")
    ap.add_argument("--qdrant-url", default="", help="a Qdrant server (or MEDLENS_QDRANT_URL)")
    ap.add_argument("--shards", type=int, default=2, help="server collections only")
    ap.add_argument("--replicas", type=int, default=1, help="server collections only")
    ap.add_argument("--ef", default="", help="also measure these search ef values, e.g. 64,512")
    ap.add_argument("--keep", action="store_true", help="keep the built collections")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--table", nargs="+", type=Path, help="print earlier runs' JSON as markdown")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    efs = [int(e) for e in args.ef.split(",") if e.strip()]
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for kind in (v.strip() for v in args.vectors.split(",") if v.strip()):
            if kind == "realistic":
                splits = tuple(x.strip() for x in args.query_split.split(",") if x.strip())
                sets = realistic(n, args.queries, args.per_source, query_splits=splits)
            elif kind == "isotropic":
                sets = [isotropic(n, args.dim, args.queries)]
            else:
                sys.exit(f"unknown vector set {kind!r}: realistic or isotropic")
            built: dict = {}
            for label in (x.strip() for x in args.settings.split(",") if x.strip()):
                row = run_one(sets, settings_for(label, args), label, args, efs, built)
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.out:  # after every row: a long run keeps what it measured
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(rows, indent=2))
            if not args.keep:
                for _, name in built.values():
                    store, _ = bench_store(args, DEFAULT_INDEX, n)
                    store.drop(name)
                    store.close()
            del sets
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
