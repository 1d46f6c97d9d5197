"""Loopback load test of the API: cold start to /readyz, latency and throughput under load.

Usage: python benchmarks/api_load.py [--clients 8] [--requests 200] [--model lite]
                                     [--out benchmarks/results/api_load.json]

1. Cold start: launch ``python -m medlens.cli serve`` with an empty MEDLENS_HOME (no prompt
   cache) and time until ``/readyz`` answers 200; then once more with the cache warm.
2. Model-bound throughput: bare ``MedLens.analyze`` in this process, one request after
   another, on the same images (the ceiling the service can reach on this machine).
3. Load: ``--clients`` concurrent clients send ``--requests`` analyze requests in total
   over loopback; p50/p95 latency, throughput, every non-200.
4. Model-bound throughput again, once the server has stopped; the ratio is the load's
   throughput over the mean of (2) and (4): on this shared 2-core box one 3-4 s bare run
   moved between 15 and 23 req/s, so bracketing the load keeps the drift out of the ratio.
Needs MEDLENS_DATA (the sample datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from medlens.api import launch

IMAGES = [
    "isic2018-task3-test/images/ISIC_0034524.jpg",
    "isic2018-task3-test/images/ISIC_0034525.jpg",
    "isic2018-task3-test/images/ISIC_0034526.jpg",
    "cxr-samples/00000001_000.png",
    "cxr-samples/tb0005.png",
    "cxr-samples/Fake_MONOHR1.dcm",
]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def cold_start(model: str | None, home: Path) -> tuple[float, subprocess.Popen, int]:
    """Seconds from process launch to /readyz 200 (the server is left running)."""
    port = launch.free_port()
    t0 = time.perf_counter()
    proc = launch.start(
        launch.api_command("127.0.0.1", port, model),
        env={"MEDLENS_HOME": str(home)},
        log_file=home / "api.log",
    )
    launch.wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc, 600, "the API")
    return time.perf_counter() - t0, proc, port


def model_bound(payloads: list[tuple[str, bytes]], n: int, model: str | None) -> dict:
    from medlens.pipeline import MedLens

    lens = MedLens(model=model)
    for name, raw in payloads:  # warm: weights, prompt caches
        lens.analyze(raw, filename=name)
    t0 = time.perf_counter()
    for i in range(n):
        name, raw = payloads[i % len(payloads)]
        lens.analyze(raw, filename=name)
    elapsed = time.perf_counter() - t0
    return {"requests": n, "seconds": round(elapsed, 3), "rps": round(n / elapsed, 2)}


def warm_up(url: str, payloads: list[tuple[str, bytes]]) -> None:
    """Each payload once, and one request with symptom text, before anything is timed,
    as ``model_bound`` warms its in-process MedLens: the service loads the text tower
    just after /readyz, and that load must not land in the measured window."""
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
        for i, (name, raw) in enumerate(payloads):
            data = {"symptoms": "itchy for two weeks"} if i == 0 else None
            c.post("/v1/analyze", files={"image": (name, raw)}, data=data)


def load(url: str, payloads: list[tuple[str, bytes]], clients: int, total: int) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    counter = iter(range(total))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, raw = payloads[i % len(payloads)]
                t = time.perf_counter()
                try:
                    r = c.post("/v1/analyze", files={"image": (name, raw)})
                    code = str(r.status_code)
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                ms = (time.perf_counter() - t) * 1000
                with lock:
                    if code == "200":
                        latencies.append(ms)
                    else:
                        errors[code] = errors.get(code, 0) + 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": total,
        "ok": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 2),
        "p50_ms": round(pct(latencies, 50), 1),
        "p95_ms": round(pct(latencies, 95), 1),
        "p99_ms": round(pct(latencies, 99), 1),
        "mean_ms": round(statistics.fmean(latencies), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--bare", type=int, default=60, help="in-process analyses for the ceiling")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/api_load.json"))
    args = ap.parse_args()
    data = Path(os.environ.get("MEDLENS_DATA", "../shared/data"))
    payloads = [(Path(p).name, (data / p).read_bytes()) for p in IMAGES]
    console = Console()

    with tempfile.TemporaryDirectory(prefix="medlens-load-") as tmp:
        home = Path(tmp)
        os.environ["MEDLENS_HOME"] = str(home)  # this process and the servers share it
        with console.status("cold start (empty MEDLENS_HOME) …"):
            cold_s, proc, _ = cold_start(args.model, home)
            launch.stop(proc)
        # The ceiling is measured alone (no server competing for the cores or for the
        # embedded store); then this process lets go of the store for the server.
        with console.status(f"model-bound: {args.bare} bare MedLens.analyze calls …"):
            bare = model_bound(payloads, args.bare, args.model)
        from medlens.retrieval.store import open_store

        store = open_store()
        if hasattr(store, "close"):
            store.close()
        with console.status("restart with warm caches …"):
            warm_s, proc, port = cold_start(args.model, home)
        try:
            url = f"http://127.0.0.1:{port}"
            info = httpx.get(f"{url}/v1/info", trust_env=False).json()
            with console.status("warm-up (not timed) …"):
                warm_up(url, payloads)
            with console.status(f"load: {args.clients} clients × {args.requests} requests …"):
                result = load(url, payloads, args.clients, args.requests)
        finally:
            launch.stop(proc)
        with console.status(f"model-bound again: {args.bare} bare MedLens.analyze calls …"):
            bare_after = model_bound(payloads, args.bare, args.model)
    ceiling = round((bare["rps"] + bare_after["rps"]) / 2, 2)

    report = {
        "cold_start_to_ready_s": round(cold_s, 2),
        "warm_cache_start_to_ready_s": round(warm_s, 2),
        "model_bound": {**bare, "rps_after_load": bare_after["rps"], "rps_mean": ceiling},
        "load": result,
        "throughput_ratio": round(result["rps"] / ceiling, 3),
        "service": {"model": info["model"], "limits": info["limits"]},
        "images": IMAGES,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    table = Table(title=f"MedLens API load ({args.clients} clients, {args.requests} requests)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for label, value in [
        ("cold start → /readyz (empty cache)", f"{cold_s:.2f} s"),
        ("start → /readyz (warm cache)", f"{warm_s:.2f} s"),
        ("p50 latency", f"{result['p50_ms']:.0f} ms"),
        ("p95 latency", f"{result['p95_ms']:.0f} ms"),
        ("throughput (API)", f"{result['rps']:.1f} req/s"),
        (
            "throughput (bare MedLens.analyze, before / after)",
            f"{bare['rps']:.1f} / {bare_after['rps']:.1f} req/s",
        ),
        ("ratio API / model-bound", f"{report['throughput_ratio']:.2f}"),
        ("errors", f"{sum(result['errors'].values())} {result['errors'] or ''}"),
    ]:
        table.add_row(label, value)
    console.print(table)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
