"""Case-library ingest throughput vs the bare model forward, and warm-cache re-index speed.

Measures, on one dataset (default: ISIC 2018 test, 1,512 images):
1. bare forward: ``encoder.embed_images`` on already-decoded pixels (batch 16) — the
   ceiling for any ingest that has to run the model;
2. cold ingest: empty cache, new library (hash, decode in DataLoader workers,
   thumbnails, forward, cache write, upsert, HNSW/payload indexing);
3. warm ingest: same images into a *new* library with the cache warm (no forward);
4. re-index: the same library again (every point already present).

    MEDLENS_DATA=../shared/data python benchmarks/ingest.py [--dataset isic2018]
        [--limit N] [--model lite] [--workers 2] [--out results/ingest.json]

State goes to a throwaway MEDLENS_HOME under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="isic2018")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--model", default="lite")
    ap.add_argument(
        "--untrained",
        action="store_true",
        help="lite towers with untrained heads (same cost; when no heads file)",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/medlens-ingest-bench"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    os.environ["MEDLENS_HOME"] = str(args.workdir)

    from medlens.datasets import load_dataset
    from medlens.io import load_image
    from medlens.retrieval.library import ingest, subset

    if args.untrained:
        from medlens.models.lite import LiteEncoder

        enc = LiteEncoder.untrained(seed=0)
    else:
        from medlens.models import load_encoder

        enc = load_encoder(args.model)
    m = load_dataset(args.dataset)
    if args.limit:
        m = subset(m, args.limit)
    n = len(m.records)

    pixels = [load_image(r.path).pixels if r.path else m.image(r) for r in m.records]
    enc.embed_images(pixels[:16], batch_size=16)  # warm-up (lazy init, allocator)
    t0 = time.perf_counter()
    enc.embed_images(pixels, batch_size=16)
    bare = time.perf_counter() - t0
    del pixels

    def run(lib: str) -> tuple[float, dict]:
        t = time.perf_counter()
        rep = ingest(m, enc, lib, batch_size=args.batch_size, workers=args.workers)
        return time.perf_counter() - t, rep.to_dict()

    cold, rep_cold = run("bench_cold")
    warm, rep_warm = run("bench_warm")
    again, rep_again = run("bench_warm")
    res = {
        "dataset": args.dataset,
        "images": n,
        "model": enc.name,
        "fingerprint": enc.fingerprint,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "bare_forward_img_s": round(n / bare, 1),
        "cold_ingest_img_s": round(n / cold, 1),
        "cold_vs_bare_forward": round(bare / cold, 3),
        "warm_ingest_img_s": round(n / warm, 1),
        "warm_speedup_vs_cold": round(cold / warm, 1),
        "reindex_same_library_s": round(again, 2),
        "reindex_speedup_vs_cold": round(cold / again, 1),
        "cold": {k: rep_cold[k] for k in ("indexed", "image_forward", "image_cache_hits")},
        "warm": {k: rep_warm[k] for k in ("indexed", "image_forward", "image_cache_hits")},
        "again": {k: rep_again[k] for k in ("indexed", "already_indexed", "image_forward")},
        "seconds": {"bare": round(bare, 2), "cold": round(cold, 2), "warm": round(warm, 2)},
    }
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
