"""Folder analysis throughput: the single-process path against Ray with 1 and 2 workers.

Analyzes the same folder (default: the first 256 ISIC 2018 test images) three ways and
reports images/s of the whole run, from the call to the last row written:
1. single process: ``medlens analyze FOLDER`` (``cli.analyze._analyze_folder``), a
   fresh ``MedLens`` (the model loads on the first image);
2. Ray, N workers: ``medlens analyze FOLDER --ray`` (``distributed.analyze``) on a
   local runtime started once before the runs (its start-up is reported apart); each
   run starts its actors, which load the model, then streams rows to a fresh .jsonl.
The prompt-embedding cache is warmed first, so no run pays for it.

    MEDLENS_DATA=../shared/data python benchmarks/ray_throughput.py [--limit 256]
        [--workers 1,2] [--batch-size 16] [--out benchmarks/results/ray_throughput.json]
    python benchmarks/ray_throughput.py --smoke   # 6 images, 1 worker (tests)

State goes to a throwaway MEDLENS_HOME under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default=None, help="encoder (default: lite)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/medlens-ray-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ray_throughput.json")
    ap.add_argument("--smoke", action="store_true", help="6 images, 1 worker")
    args = ap.parse_args()
    if args.smoke:
        args.limit, args.workers = 6, "1"

    shutil.rmtree(args.workdir, ignore_errors=True)
    os.environ["MEDLENS_HOME"] = str(args.workdir / "home")
    data = Path(os.environ.get("MEDLENS_DATA", ROOT.parent / "shared" / "data"))
    source = args.folder or data / "isic2018-task3-test" / "images"
    folder = args.workdir / "folder"  # the first --limit images, as symlinks
    folder.mkdir(parents=True)
    for f in sorted(source.glob("*.jpg"))[: args.limit]:
        (folder / f.name).symlink_to(f.resolve())

    import ray

    from medlens.cli.analyze import _analyze_folder, image_files
    from medlens.config import get_settings
    from medlens.distributed.analyze import analyze_folder
    from medlens.distributed.runtime import RayOptions
    from medlens.pipeline import MedLens

    settings = get_settings()
    files = image_files(folder)
    n = len(files)
    MedLens(model=args.model, settings=settings).analyze(files[0])  # warm the prompt cache

    rows = []
    t = time.perf_counter()
    lens = MedLens(model=args.model, settings=settings)
    _analyze_folder(
        lens,
        folder,
        domain="auto",
        symptoms=None,
        context=None,
        top_k=5,
        out=args.workdir / "single.jsonl",
    )
    rows.append(_row("single process", 0, n, time.perf_counter() - t))

    counts = [int(w) for w in args.workers.split(",")]
    t = time.perf_counter()
    ray.init(num_cpus=max(os.cpu_count() or 1, max(counts) + 1), include_dashboard=False)
    ray_start = time.perf_counter() - t
    try:
        for w in counts:
            opts = RayOptions(workers=w, batch_size=args.batch_size)
            t = time.perf_counter()
            run = analyze_folder(
                folder,
                files,
                args.workdir / f"ray{w}.jsonl",
                settings=settings,
                options=opts,
                model=args.model,
            )
            assert run.analyzed + run.failed == n, run
            rows.append(_row(f"ray, {w} worker{'s' * (w > 1)}", w, n, time.perf_counter() - t))
    finally:
        ray.shutdown()

    res = {
        "what": "medlens analyze FOLDER: single process vs --ray (local runtime)",
        "folder": str(source),
        "images": n,
        "model": args.model or settings.model,
        "batch_size": args.batch_size,
        "ray_version": ray.__version__,
        "ray_runtime_start_s": round(ray_start, 2),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\n{n} images, {os.cpu_count()} CPUs, Ray start-up {ray_start:.1f} s (not counted)\n")
    print("| mode | workers | images | wall s | images/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['workers']} | {r['images']} | {r['wall_s']} "
            f"| {r['images_per_s']} |"
        )


def _row(mode: str, workers: int, n: int, seconds: float) -> dict:
    return {
        "mode": mode,
        "workers": workers,
        "images": n,
        "wall_s": round(seconds, 2),
        "images_per_s": round(n / seconds, 2),
    }


if __name__ == "__main__":
    main()
