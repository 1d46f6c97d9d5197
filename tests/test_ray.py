"""``medlens index --ray`` and ``medlens analyze FOLDER --ray`` on a real local Ray runtime
with two workers, on the sample data: the same points and analyses as the single-process
path, and a worker killed mid-run changes nothing in the outputs (Ray restarts it and
retries its batch). The encoder for the ingest is the real lite model with deterministic
untrained heads loaded from a file, as in test_retrieval.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray  # the [ray] extra: make test installs it (a missing install fails, never skips)

from medlens import embeddings
from medlens.config import get_settings
from medlens.datasets import load_dataset
from medlens.distributed.outputs import JsonlSink, ParquetSink, folder_row, read_rows
from medlens.distributed.runtime import RayOptions
from medlens.errors import ClusterError
from medlens.retrieval.library import collection_name, ingest, subset
from medlens.retrieval.store import open_store

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_runtime() -> Any:
    """One local runtime for the module: two 1-CPU workers plus a share for the reads."""
    ray.init(num_cpus=3, include_dashboard=False, object_store_memory=256 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medlens.models.lite import LiteEncoder

    path = tmp_path_factory.mktemp("heads") / "ray_heads.safetensors"
    LiteEncoder.untrained(seed=0).save_heads(path, {"purpose": "ray tests"})
    return path


def _worker_pids(udf: str) -> list[int]:
    """Processes of the Ray actors running ``udf`` (Ray titles them MapWorker(...))."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if f"MapBatches({udf})".encode() in cmd:
            pids.append(int(d.name))
    return sorted(pids)


class KillOneWorker:
    """A progress callback that SIGKILLs one worker when the first results arrive."""

    def __init__(self, udf: str):
        self.udf, self.killed, self.done = udf, None, 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.killed is None and (pids := _worker_pids(self.udf)):
            self.killed = pids[0]
            os.kill(pids[0], signal.SIGKILL)


def test_ray_ingest_matches_single_process_and_survives_a_killed_worker(
    ray_runtime: Any, heads_file: Path, data_dir: Path, tmp_path: Path
) -> None:
    from medlens.distributed.ingest import ray_ingest
    from medlens.models import load_encoder

    spec = f"lite:{heads_file}"
    m = subset(load_dataset("isic2018"), 24)
    settings = get_settings()
    kill = KillOneWorker("EmbedWorker")
    opts = RayOptions(workers=2, batch_size=4)
    rep = ray_ingest(m, spec, "t_ray", settings=settings, options=opts, advance=kill)
    assert kill.killed is not None, "no Ray worker was found to kill"
    assert rep.indexed == 24 and rep.image_forward == 24 and not rep.failed
    assert kill.done == 24

    # The single-process ingest, computing every vector itself (a cache of its own).
    encoder = load_encoder(spec)
    own_cache = embeddings.Store(tmp_path / "cache.sqlite")
    single = ingest(m, encoder, "t_single", workers=0, cache=own_cache)
    assert single.indexed == 24 and single.image_forward == 24

    store = open_store()

    def points(library: str) -> dict[str, Any]:
        coll = collection_name(library, m.domain, encoder.fingerprint)
        assert store.count(coll) == 24  # nothing lost, nothing duplicated
        return {p.id: p for p in store.scroll(coll, with_vectors=True)}

    a, b = points("t_ray"), points("t_single")
    assert set(a) == set(b) and len(a) == 24
    for pid, p in a.items():
        assert p.payload == b[pid].payload
        assert np.allclose(p.vectors["image"], b[pid].vectors["image"], atol=1e-5)

    # Resumable: everything is indexed, so nothing reaches Ray.
    again = ray_ingest(m, spec, "t_ray", settings=settings, options=opts)
    assert again.already_indexed == 24 and again.indexed == 0 and again.image_forward == 0


def _folder(data_dir: Path, tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "folder"
    folder.mkdir()
    for f in sorted((data_dir / "isic2018-task3-test" / "images").glob("*.jpg"))[:n]:
        (folder / f.name).symlink_to(f)
    return folder


def _same_analysis(x: dict[str, Any], y: dict[str, Any]) -> None:
    if "error" in x:  # a --ray error row also names the content hash, for the resume
        assert x["error"] == y["error"] and len(y["content_hash"]) == 64
        return
    assert x.keys() == y.keys()
    assert [f["id"] for f in x["findings"]] == [f["id"] for f in y["findings"]]
    px = [f["probability"] for f in x["findings"]]
    py = [f["probability"] for f in y["findings"]]
    assert np.allclose(px, py, atol=1e-6)
    for k in x.keys() - {"findings", "timings_ms"}:
        assert x[k] == y[k], k


def test_ray_analyze_folder_matches_single_process_resumes_and_survives_a_killed_worker(
    ray_runtime: Any, data_dir: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from medlens.cli import app
    from medlens.distributed.analyze import analyze_folder

    folder = _folder(data_dir, tmp_path, 16)
    single_out = tmp_path / "single.jsonl"
    r = CliRunner().invoke(app, ["analyze", str(folder), "--out", str(single_out)])
    assert r.exit_code == 0, r.output
    single = {row["file"]: row for row in read_rows(single_out)}
    assert len(single) == 16

    # An earlier run that stopped after 6 rows, in the middle of writing the 7th.
    out = tmp_path / "ray.jsonl"
    first = [single[k] for k in sorted(single)[:6]]
    text = "".join(json.dumps(row) + "\n" for row in first)
    out.write_text(text + json.dumps(single[sorted(single)[6]])[:40])

    kill = KillOneWorker("AnalyzeWorker")
    files = sorted(p for p in folder.iterdir())
    opts = RayOptions(workers=2, batch_size=2)
    run = analyze_folder(folder, files, out, settings=get_settings(), options=opts, advance=kill)
    assert kill.killed is not None, "no Ray worker was found to kill"
    assert run.already_written == 6 and run.analyzed + run.failed == 10
    rows = read_rows(out)
    assert len(rows) == 16 and len({row["file"] for row in rows}) == 16  # none twice
    for row in rows:
        _same_analysis(single[row["file"]], row)

    again = analyze_folder(folder, files, out, settings=get_settings(), options=opts)
    assert again.already_written == 16 and again.analyzed == again.failed == 0
    assert len(read_rows(out)) == 16


def test_parquet_output_is_resumable(tmp_path: Path) -> None:
    rows = [
        folder_row(
            "a.jpg",
            {
                "domain": "dermatology",
                "input": {"content_hash": "h1"},
                "findings": [{"id": "mel", "probability": 0.25}],
                "triage": {"level": "urgent"},
            },
        ),
        folder_row("b.jpg", error="CorruptImage: no", content_hash="h2"),
    ]
    out = tmp_path / "r.parquet"
    sink = ParquetSink(out)
    assert len(sink.write(rows + rows[:1])) == 2  # a repeated row is written once
    sink.close()
    again = ParquetSink(out)
    assert again.written == {("a.jpg", "h1"), ("b.jpg", "h2")}
    assert again.write(rows) == []
    again.close()
    assert read_rows(out) == rows
    import pyarrow.parquet as pq

    t = pq.read_table(out).to_pydict()  # one table over the part files
    assert t["top_finding"].count("mel") == 1 and t["error"].count("CorruptImage: no") == 1
    # A JSONL output keeps its complete lines and drops one cut short by a crash.
    jl = tmp_path / "r.jsonl"
    jl.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:10])
    sink = JsonlSink(jl)
    assert sink.written == {("a.jpg", "h1")}
    sink.close()
    assert read_rows(jl) == rows[:1]


def test_ray_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from medlens.distributed.runtime import require_ray

    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "ray", None)  # as if the extra were not installed
        with pytest.raises(ClusterError, match=r"pip install 'medlens\[ray\]'"):
            require_ray()
    # Through the command line: exit code 2, one line, in seconds.
    env = {**os.environ, "MEDLENS_HOME": str(tmp_path / "home")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlens.cli",
            "index",
            "isic2018",
            "--limit",
            "2",
            "--ray-address",
            "127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and "ClusterError: cannot reach the Ray cluster" in r.stderr
    # `import medlens` and `medlens --help` never load Ray.
    code = (
        "import sys, medlens, medlens.cli, medlens.distributed.runtime; "
        "from typer.testing import CliRunner; "
        "assert CliRunner().invoke(medlens.cli.app, ['index', '--help']).exit_code == 0; "
        "assert 'ray' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_ray_throughput_benchmark_smoke(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "MEDLENS_HOME": str(tmp_path / "home")}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "ray_throughput.py"),
            "--smoke",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert "|" in r.stdout and res["smoke"] is True
    assert all(row["images_per_s"] > 0 for row in res["rows"])
    assert {row["mode"] for row in res["rows"]} >= {"single process", "ray, 1 worker"}
