"""``medlens analyze FOLDER --ray``: ``MedLens.analyze`` on Ray workers, every file's row
streamed to a resumable .jsonl / .parquet output (``distributed.outputs``).

Ray Data reads the files; an actor pool holds one ``MedLens`` per worker (the model
loaded once) and returns each file's analysis JSON and embedding. Pixels, identifiers
and the DICOM header stay in the worker: the row is the same ``Analysis.to_dict()`` the
single-process path writes. Similar cases and knowledge passages come from the vector
store: a Qdrant server (MEDLENS_QDRANT_URL) is queried by the workers themselves; the
embedded store can be open in one process only, so this process adds them to each row,
from the embedding, through the same ``MedLens`` method the analysis uses.

Resume: every file is hashed here first; (file, content hash) pairs already in the
output are skipped, and a row is never written twice (a retried Ray task included).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlens.config import Settings
from medlens.distributed.outputs import folder_row, open_sink
from medlens.distributed.runtime import RayOptions, actor_batches, preflight, ray_runtime
from medlens.errors import ClusterError, MedLensError


@dataclass
class FolderRun:
    """What a distributed folder analysis did."""

    out: Path
    files: int
    already_written: int = 0
    analyzed: int = 0
    failed: int = 0
    seconds: float = 0.0


class AnalyzeWorker:
    """A Ray actor: one ``MedLens`` (model, cards, prompt embeddings loaded once) that
    analyzes file bytes exactly as ``MedLens.analyze(path)`` analyzes the file."""

    def __init__(
        self,
        model: str | None,
        device: str | None,
        settings: Settings,
        retrieval: bool,
        request: Mapping[str, Any],
    ):
        from medlens.pipeline import MedLens

        self.lens = MedLens(model=model, device=device, settings=settings, retrieval=retrieval)
        self.request = dict(request)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["path"])
        results, errors = [""] * n, [""] * n
        vectors = np.zeros((n, self.lens.encoder.dim), np.float32)
        for i, (path, data) in enumerate(zip(batch["path"], batch["bytes"], strict=True)):
            try:
                a = self.lens.analyze(bytes(data), filename=Path(str(path)).name, **self.request)
            except MedLensError as exc:
                errors[i] = f"{type(exc).__name__}: {exc}"
                continue
            results[i] = json.dumps(a.to_dict(), ensure_ascii=False)
            if a.embedding is not None:
                vectors[i] = np.asarray(a.embedding, np.float32).ravel()
        return {
            "path": np.asarray(batch["path"], dtype=object),
            "result": np.asarray(results, dtype=object),
            "error": np.asarray(errors, dtype=object),
            "embedding": vectors,
            "fingerprint": np.asarray([self.lens.encoder.fingerprint] * n, dtype=object),
        }


def analyze_folder(
    folder: Path,
    files: list[Path],
    out: Path,
    *,
    settings: Settings,
    options: RayOptions,
    model: str | None = None,
    domain: str = "auto",
    symptoms: str | None = None,
    context: Mapping[str, Any] | None = None,
    top_k: int = 5,
    advance: Callable[[int], None] | None = None,
) -> FolderRun:
    """Analyze ``files`` (under ``folder``) on Ray, appending their rows to ``out``;
    rows already there (same file, same content) are skipped."""
    from medlens.embeddings import file_key
    from medlens.pipeline import MedLens

    t0 = time.perf_counter()
    preflight(options)
    sink = open_sink(out)
    run = FolderRun(out=out, files=len(files))
    lens = MedLens(model=model, settings=settings)  # this process: checks and retrieval
    by_path: dict[str, tuple[str, str]] = {}
    early: list[dict[str, Any]] = []
    try:
        for f in files:
            rel = str(f.relative_to(folder))
            try:
                h = file_key(f)
            except OSError as exc:
                early.append(folder_row(rel, error=f"InputError: cannot read {rel}: {exc}"))
                continue
            if (rel, h) in sink.written:
                run.already_written += 1
            elif f.stat().st_size > settings.max_bytes:
                try:  # too large to ship: refused here by its size, with the usual message
                    lens.decode(f)
                except MedLensError as exc:
                    err = f"{type(exc).__name__}: {exc}"
                    early.append(folder_row(rel, error=err, content_hash=h))
                else:  # it shrank meanwhile
                    by_path[os.path.abspath(f)] = (rel, h)
            else:
                by_path[os.path.abspath(f)] = (rel, h)
        if advance and run.already_written:
            advance(run.already_written)
        _write(sink, early, run, advance)
        if by_path:
            _run_on_ray(
                lens,
                by_path,
                sink,
                run,
                settings,
                options,
                advance,
                model=model,
                request={
                    "domain": domain,
                    "symptoms": symptoms,
                    "context": dict(context) if context else None,
                    "top_k": top_k,
                },
            )
    finally:
        sink.close()
    run.seconds = round(time.perf_counter() - t0, 2)
    return run


def _run_on_ray(lens, by_path, sink, run, settings, options, advance, *, model, request):
    server = bool(settings.qdrant_url)  # workers may query a server; embedded: only here
    with ray_runtime(options) as ray:
        kwargs = {
            "model": model,
            "device": options.device,
            "settings": settings,
            "retrieval": server and lens.retrieval,
            "request": request,
        }
        for out in actor_batches(ray, list(by_path), AnalyzeWorker, kwargs, options):
            rows = []
            for j, path in enumerate(out["path"]):
                rel, h = by_path[str(path)]
                if out["error"][j]:
                    rows.append(folder_row(rel, error=str(out["error"][j]), content_hash=h))
                    continue
                if out["fingerprint"][j] != lens.encoder.fingerprint:
                    raise ClusterError(
                        f"a Ray worker runs model {lens.model_name} as {out['fingerprint'][j]}, "
                        f"this process as {lens.encoder.fingerprint}: install the same MedLens "
                        "and weights on every node"
                    )
                result = json.loads(out["result"][j])
                if not server:
                    _add_retrieval(lens, result, out["embedding"][j])
                rows.append(folder_row(rel, result))
            _write(sink, rows, run, advance)


def _add_retrieval(lens: Any, result: dict[str, Any], embedding: np.ndarray) -> None:
    """Similar cases and knowledge passages for a worker's analysis, from this process's
    store: the findings they are for are the ones the analysis describes."""
    from medlens.analysis.result import KnowledgePassage, SimilarCase

    t = time.perf_counter()
    ids = [d["id"] for d in result["descriptions"]]
    cases, passages, note = lens.retrieval_context(np.asarray(embedding), result["domain"], ids)
    result["similar_cases"] = [SimilarCase.model_validate(c).model_dump(mode="json") for c in cases]
    result["knowledge"] = [
        KnowledgePassage.model_validate(p).model_dump(mode="json") for p in passages
    ]
    result["context_note"] = note
    result["timings_ms"]["retrieval"] = round((time.perf_counter() - t) * 1000, 1)


def _write(sink: Any, rows: list[dict[str, Any]], run: FolderRun, advance: Any) -> None:
    new = sink.write(rows)
    run.analyzed += sum(1 for r in new if "error" not in r)
    run.failed += sum(1 for r in new if "error" in r)
    if advance and new:
        advance(len(new))
