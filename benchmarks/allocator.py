"""glibc malloc tuning (``MEDLENS_MALLOC_TUNING``, ``models._util.ALLOCATOR_SETTINGS``):
the lite forward and the batch pipeline with it on and off.

Each child process loads the shipped model through ``load_encoder`` (which applies the
tuning unless switched off) and times, on real ISIC 2018 test JPEGs:

- ``forward``: image tower + head on a ready channels-last tensor at each batch size;
- ``files``: decode + preprocess + forward through ``medlens.io`` and ``embed_images``;

and reports its user and system CPU seconds and its peak RSS. Children with the tuning
on and off alternate (``--pairs`` of them), so machine load hits both alike; the table
shows the medians and the speed ratio on ÷ off.

    MEDLENS_DATA=../shared/data python benchmarks/allocator.py [--pairs 3]
        [--out benchmarks/results/allocator.json]
    python benchmarks/allocator.py --smoke     # one short pair: checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
import numpy as np, torch
from pathlib import Path
from medlens.io import load_image
from medlens.models import load_encoder

sizes, reps, data = json.loads(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
files = sorted((data / "isic2018-task3-test/images").glob("*.jpg"))[: max(sizes)]
enc = load_encoder("lite")

def median_ms(fn):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))

out = {}
for bs in sizes:
    x = enc.preprocess([load_image(f).pixels for f in files[:bs]])
    x = x.contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode():
            enc.image_head(enc.tower_forward(x))

    def from_files():
        enc.embed_images([load_image(f).pixels for f in files[:bs]], batch_size=bs)

    out[bs] = {"forward_ms": median_ms(forward), "files_ms": median_ms(from_files)}
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = next(
    (int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")),
    ru.ru_maxrss / 1024,
)
print(json.dumps({"rows": out, "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "peak_rss_mb": hwm}))
"""


def child(tuning: bool, sizes: list[int], reps: int, data: Path) -> dict:
    env = {**os.environ, "MEDLENS_MALLOC_TUNING": "1" if tuning else "0"}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(sizes), str(reps), str(data)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(pairs: int, sizes: list[int], reps: int) -> dict:
    from medlens.evaluation.protocols import machine_info

    data = Path(os.environ.get("MEDLENS_DATA", "../shared/data"))
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(pairs):
        for mode in ("on", "off"):
            runs[mode].append(child(mode == "on", sizes, reps, data))

    def med(mode: str, get) -> float:
        return round(statistics.median(get(r) for r in runs[mode]), 2)

    rows = []
    for bs in sizes:
        row: dict = {"batch_size": bs}
        for what in ("forward_ms", "files_ms"):
            for mode in ("on", "off"):
                row[f"{what}_{mode}"] = med(mode, lambda r, w=what, b=bs: r["rows"][str(b)][w])
            row[f"{what[:-3]}_speedup"] = round(row[f"{what}_off"] / row[f"{what}_on"], 2)
        rows.append(row)
    return {
        "benchmark": "allocator",
        "rows": rows,
        "process": {
            mode: {k: med(mode, lambda r, k=k: r[k]) for k in ("user_s", "sys_s", "peak_rss_mb")}
            for mode in runs
        },
        "children": runs,
        "method": f"{pairs} pairs of child processes, tuning on/off alternating; "
        f"median of {reps} timed calls per measure per child; medians over children",
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/allocator.py " + " ".join(sys.argv[1:]),
    }


def print_table(result: dict) -> None:
    print("| batch | forward ms on / off | speed-up | files ms on / off | speed-up |")
    print("|---|---|---|---|---|")
    for r in result["rows"]:
        print(
            f"| {r['batch_size']} | {r['forward_ms_on']} / {r['forward_ms_off']} | "
            f"{r['forward_speedup']}× | {r['files_ms_on']} / {r['files_ms_off']} | "
            f"{r['files_speedup']}× |"
        )
    p = result["process"]
    print(
        f"per child: system CPU {p['on']['sys_s']} s on / {p['off']['sys_s']} s off, user "
        f"{p['on']['user_s']} / {p['off']['user_s']} s, peak RSS {p['on']['peak_rss_mb']} / "
        f"{p['off']['peak_rss_mb']} MB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--smoke", action="store_true", help="one pair, batch 1 and 2, 2 reps")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/allocator.json"))
    args = ap.parse_args()
    if args.smoke:
        args.pairs, args.batch_sizes, args.reps = 1, "1,2", 2
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    result = {**run(args.pairs, sizes, args.reps), "smoke": args.smoke}
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
