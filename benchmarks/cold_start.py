"""Cold start (issue 17): a fresh interpreter's first analysis result, the service's
start to ``/readyz``, and the imports behind them, for one medlens source tree.

    MEDLENS_DATA=../shared/data python benchmarks/cold_start.py --out after.json
    git worktree add /tmp/before <commit>
    MEDLENS_DATA=../shared/data python benchmarks/cold_start.py --src /tmp/before/src \\
        --out before.json
    python benchmarks/cold_start.py --table before.json after.json   # Markdown table

``--src`` is the tree measured (default: this checkout's ``src/``): the children run with
``PYTHONPATH`` set to it, so an older commit is measured by the same script, on the same
machine, minutes apart. Every measurement starts from a MEDLENS_HOME that one analysis
of the same tree has warmed (prompt caches filled; the goal is stated for a warm home).

- **first result**: wall seconds from launching ``python -c`` to its first skin analysis
  (ISIC 224 px JPEG) printed, median of ``--runs``; with the phases (import of
  ``medlens``, ``MedLens()``, the first ``analyze``) and whether ``transformers`` was
  imported on the way.
- **imports**: ``python -X importtime`` of the same first result; the ten top-level
  imports with the largest cumulative time.
- **service**: wall seconds from launching ``medlens serve`` to ``/readyz`` 200 (warm
  home), median of ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SKIN = "isic2018-task3-test/images/ISIC_0034524.jpg"

FIRST_RESULT = """
import json, sys, time
t0 = float(sys.argv[1])
t1 = time.time()
from medlens import MedLens
t2 = time.time()
lens = MedLens()
t3 = time.time()
a = lens.analyze(sys.argv[2])
t4 = time.time()
print(json.dumps({
    "wall_s": t4 - t0, "interpreter_s": t1 - t0, "import_s": t2 - t1,
    "construct_s": t3 - t2, "first_analyze_s": t4 - t3,
    "transformers_imported": "transformers" in sys.modules,
    "torch_imported": "torch" in sys.modules, "engine": type(lens.encoder).__name__,
    "top": a.findings[0].id,
}))
"""


def _env(src: Path, home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src), "MEDLENS_HOME": str(home)}


def first_result(src: Path, home: Path, image: Path, importtime: bool = False) -> dict:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", FIRST_RESULT]
    out = subprocess.run(
        [*cmd, repr(time.time()), str(image)],
        env=_env(src, home),
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if importtime:
        res["importtime"] = top_imports(out.stderr)
    return res


def top_imports(stderr: str, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` top-level imports (no indentation in ``-X importtime``'s tree) with the
    largest cumulative time, in ms."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cum, name = line.split("|")
        if name.startswith("  "):  # nested: already counted in its parent
            continue
        try:
            rows.append({"module": name.strip(), "cumulative_ms": round(int(cum) / 1000, 1)})
        except ValueError:  # the header line
            continue
    return sorted(rows, key=lambda r: -r["cumulative_ms"])[:n]


def service_ready(src: Path, home: Path) -> float:
    from medlens.api import launch

    port = launch.free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        launch.api_command("127.0.0.1", port),
        env=_env(src, home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        launch.wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc, 600, "the API")
        return time.perf_counter() - t0
    finally:
        launch.stop(proc)


def measure(src: Path, runs: int) -> dict[str, Any]:
    data = Path(os.environ.get("MEDLENS_DATA", ROOT.parent / "shared" / "data"))
    image = data / SKIN
    if not image.is_file():
        raise SystemExit(f"{image} not found: set MEDLENS_DATA")
    commit = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="medlens-cold-") as tmp:
        home = Path(tmp)
        first_result(src, home, image)  # warm the home (prompt caches)
        cold = [first_result(src, home, image) for _ in range(runs)]
        imports = first_result(src, home, image, importtime=True)["importtime"]
        ready = [service_ready(src, home) for _ in range(runs)]
    med = {k: round(statistics.median(c[k] for c in cold), 2) for k in cold[0] if k.endswith("_s")}
    return {
        "src": str(src),
        "commit": commit,
        "runs": runs,
        "first_result_s": med["wall_s"],
        "first_result_runs_s": [round(c["wall_s"], 2) for c in cold],
        "phases_s": {k: v for k, v in med.items() if k != "wall_s"},
        "transformers_imported": cold[-1]["transformers_imported"],
        "torch_imported": cold[-1].get("torch_imported"),
        "engine": cold[-1].get("engine"),
        "readyz_s": round(statistics.median(ready), 2),
        "readyz_runs_s": [round(r, 2) for r in ready],
        "importtime_top": imports,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d"),
    }


def table(before: dict[str, Any], after: dict[str, Any]) -> str:
    rows = [
        ("first result, fresh interpreter (s)", "first_result_s"),
        ("… import medlens (s)", ("phases_s", "import_s")),
        ("… MedLens() (s)", ("phases_s", "construct_s")),
        ("… first analyze (s)", ("phases_s", "first_analyze_s")),
        ("transformers imported", "transformers_imported"),
        ("torch imported", "torch_imported"),
        ("image tower engine", "engine"),
        ("service start → /readyz, warm home (s)", "readyz_s"),
    ]

    def get(d: dict, key: Any) -> Any:  # older results lack the newer keys
        return d[key[0]][key[1]] if isinstance(key, tuple) else d.get(key, "–")

    out = [
        f"| measure | before (`{before['commit']}`) | after (`{after['commit']}`) |",
        "|---|---|---|",
    ]
    out += [f"| {label} | {get(before, k)} | {get(after, k)} |" for label, k in rows]
    out += ["", "Top-level imports by cumulative time (ms), `python -X importtime`:", ""]
    out += ["| before | ms | after | ms |", "|---|---|---|---|"]
    b, a = before["importtime_top"], after["importtime_top"]
    for i in range(max(len(b), len(a))):
        bl = (b[i]["module"], b[i]["cumulative_ms"]) if i < len(b) else ("", "")
        al = (a[i]["module"], a[i]["cumulative_ms"]) if i < len(a) else ("", "")
        out.append(f"| {bl[0]} | {bl[1]} | {al[0]} | {al[1]} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="medlens source tree")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    ap.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args(argv)
    if args.table:
        before, after = (json.loads(p.read_text()) for p in args.table)
        print(table(before, after), end="")
        return 0
    res = measure(args.src.resolve(), args.runs)
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
