"""Embedded vector search: latency p50/p95 and recall@10 against exact search.

Builds a collection of N vectors of the model's dimension (256 for lite) through
``medlens.retrieval.store.EdgeStore`` (the default backend), with the payload a case
library has (labels, age, domain, split) and payload indexes, then times filtered and
unfiltered top-10 queries and checks them against exact numpy search.

The vectors are synthetic but shaped like image embeddings (L2-normalised, clustered by
class: a Gaussian mixture of 64 clusters with within-cluster spread comparable to lite's
image embeddings); uniform random vectors are a needlessly pessimistic HNSW case, real
sample embeddings are too few (~10k) for 100k/1M. Labels follow the clusters, age is
uniform 18-90.

    python benchmarks/vector_search.py --sizes 10000,100000 --out results/vector_search.json
    python benchmarks/vector_search.py --sizes 1000000 --workdir /tmp/ml-bench   # ~1 GiB index
    python benchmarks/vector_search.py --sizes 10000 --client-local   # qdrant-client local mode
    python benchmarks/vector_search.py --sizes 1000000 --ef 256,512,1024   # recall vs. ef ramp

Speed goals are reported here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from medlens.retrieval.store import Condition, EdgeStore, PointData, ServerStore

LABELS = ("nv", "mel", "bkl", "bcc", "akiec", "vasc", "df")
LABEL_P = np.array([0.6, 0.11, 0.11, 0.06, 0.04, 0.04, 0.04])


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


def build(store, name: str, vecs, labels, age, batch: int = 4000) -> dict[str, float]:
    store.drop(name)
    store.create(name, {"image": vecs.shape[1]})
    t0 = time.perf_counter()
    for s in range(0, len(vecs), batch):
        pts = [
            PointData(
                point_id(i),
                {"image": vecs[i]},
                {
                    "labels": [LABELS[labels[i]]],
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


def measure(store, name, vecs, labels, age, qs, filtered: bool, k: int = 10, ef=None):
    lat, recalls = [], []
    rng = np.random.default_rng(2)
    for q in qs[:20]:  # warm-up: first touches of the mmapped index
        store.search(name, q, "image", k=k, ef=ef)
    for q in qs:
        if filtered:
            lab = int(rng.integers(0, 3))  # nv, mel, bkl: 60 %, 11 %, 11 % of points
            lo = float(rng.choice([40.0, 60.0]))
            conds = [Condition("labels", "eq", LABELS[lab]), Condition("age", "gte", lo)]
            mask = (labels == lab) & (age >= lo)
        else:
            conds, mask = [], np.ones(len(vecs), bool)
        t0 = time.perf_counter()
        hits = store.search(name, q, "image", k=k, filters=conds, ef=ef)
        lat.append((time.perf_counter() - t0) * 1000)
        got = {h.payload["i"] for h in hits}
        truth = set(exact_topk(vecs, mask, q, k).tolist())
        recalls.append(len(got & truth) / max(1, len(truth)))
    lat_a = np.array(lat)
    return {
        "p50_ms": round(float(np.percentile(lat_a, 50)), 3),
        "p95_ms": round(float(np.percentile(lat_a, 95)), 3),
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "queries": len(qs),
    }


def rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def run_size(
    n: int, dim: int, workdir: Path, n_queries: int, client_local: bool, efs: list[int]
) -> dict:
    vecs, labels, age, centers, _ = make_data(n, dim)
    qs = queries(centers, n_queries)
    row: dict = {"n": n, "dim": dim}
    if client_local:
        store = ServerStore(path=workdir / f"client-{n}")
        row["backend"] = "qdrant-client local mode"
    else:
        store = EdgeStore(workdir)
        row["backend"] = "qdrant-edge (embedded)"
    name = f"bench-{n}"
    row.update(build(store, name, vecs, labels, age))
    row["filtered"] = measure(store, name, vecs, labels, age, qs, filtered=True)
    row["unfiltered"] = measure(store, name, vecs, labels, age, qs, filtered=False)
    row["search_ef"] = EdgeStore.SEARCH_EF
    row["ef_ramp"] = {
        str(ef): {
            "filtered": measure(store, name, vecs, labels, age, qs, filtered=True, ef=ef),
            "unfiltered": measure(store, name, vecs, labels, age, qs, filtered=False, ef=ef),
        }
        for ef in efs
    }
    row["peak_rss_gib"] = rss_gib()
    if not client_local:
        row["disk_mib"] = round(
            sum(p.stat().st_size for p in (workdir / name).rglob("*") if p.is_file()) / 2**20
        )
    store.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/medlens-vector-bench"))
    ap.add_argument("--client-local", action="store_true", help="measure qdrant-client local mode")
    ap.add_argument("--ef", default="", help="also measure these search ef values, e.g. 64,512")
    ap.add_argument("--keep", action="store_true", help="keep the built collections")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        efs = [int(e) for e in args.ef.split(",") if e.strip()]
        row = run_size(n, args.dim, args.workdir, args.queries, args.client_local, efs)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
