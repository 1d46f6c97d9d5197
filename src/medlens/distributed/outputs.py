"""Rows of a folder analysis and the files they go to.

One row per file: ``{"file": <path relative to the folder>, **analysis}``, or
``{"file", "error"}`` when the file could not be analyzed. The same rows come out of
``medlens analyze FOLDER`` with or without ``--ray``, except that a ``--ray`` error row
also names the file's ``content_hash`` (so a re-run skips it). The Ray path writes rows
as they arrive, to files a re-run can resume (``open_sink``):

- ``.jsonl``: one row per line, appended and flushed per batch; a line cut short by a
  crash is dropped when the file is opened again.
- ``.parquet``: a Parquet dataset folder (``part-*.parquet``, each written atomically),
  readable as one table by pandas, pyarrow, DuckDB or Spark. Summary columns
  (``SUMMARY``) plus ``analysis``, the row's JSON.

A row is identified by (file, content hash): a re-run skips rows already written, and a
file whose content changed is analyzed again.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Protocol

from medlens.errors import ConfigError

SUMMARY = ("file", "domain", "top_finding", "probability", "triage", "error")
Key = tuple[str, str | None]


def folder_row(
    file: str,
    result: dict[str, Any] | None = None,
    *,
    error: str | None = None,
    content_hash: str | None = None,
) -> dict[str, Any]:
    """The output row of one file: its analysis, or its error."""
    if result is not None:
        return {"file": file, **result}
    if content_hash is None:  # not read: a re-run tries it again
        return {"file": file, "error": error}
    return {"file": file, "content_hash": content_hash, "error": error}


def row_key(row: dict[str, Any]) -> Key:
    """(file, content hash) of a row: what a resumed run skips."""
    h = row.get("content_hash") or (row.get("input") or {}).get("content_hash")
    return str(row["file"]), h


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """The CSV / Parquet summary columns of a row (``SUMMARY``)."""
    top = row["findings"][0] if row.get("findings") else {}
    return {
        "file": row["file"],
        "domain": row.get("domain", ""),
        "top_finding": top.get("id", ""),
        "probability": top.get("probability", ""),
        "triage": (row.get("triage") or {}).get("level", ""),
        "error": row.get("error", ""),
    }


class Sink(Protocol):
    path: Path
    written: set[Key]

    def write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class JsonlSink:
    """Rows appended to a JSON-lines file; what it already holds is read first."""

    def __init__(self, path: Path):
        self.path, self.written = path, set()
        path.parent.mkdir(parents=True, exist_ok=True)
        good = 0
        if path.is_file():
            with open(path, "rb") as fh:
                for line in fh:
                    if not line.endswith(b"\n"):
                        break  # cut short by a crash: dropped, and done again
                    try:
                        self.written.add(row_key(json.loads(line)))
                    except (ValueError, KeyError):
                        break
                    good += len(line)
            os.truncate(path, good)
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed by close())

    def write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append the rows not written yet; returns them."""
        new = _new_rows(self.written, rows)
        for r in new:
            self._fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        self._fh.flush()
        return new

    def close(self) -> None:
        self._fh.close()


class ParquetSink:
    """Rows buffered and written as Parquet part files into the folder ``path``."""

    def __init__(self, path: Path, rows_per_part: int = 256):
        import pyarrow.parquet as pq

        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is a file: a .parquet output is a folder of part files")
        path.mkdir(parents=True, exist_ok=True)
        self.path, self.rows_per_part = path, rows_per_part
        self.written: set[Key] = set()
        self._buffer: list[dict[str, Any]] = []
        for part in sorted(path.glob("part-*.parquet")):
            t = pq.read_table(part, columns=["file", "content_hash"]).to_pydict()
            self.written.update(zip(t["file"], t["content_hash"], strict=True))

    def write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Buffer the rows not written yet (a part file per ``rows_per_part``)."""
        new = _new_rows(self.written, rows)
        self._buffer += new
        if len(self._buffer) >= self.rows_per_part:
            self._flush()
        return new

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buffer:
            return
        cols: dict[str, list[Any]] = {c: [] for c in (*SUMMARY, "content_hash", "analysis")}
        for r in self._buffer:
            s = summary(r)
            for c in SUMMARY:
                cols[c].append(s[c] if s[c] != "" else None)
            cols["content_hash"].append(row_key(r)[1])
            cols["analysis"].append(json.dumps(r, ensure_ascii=False))
        schema = pa.schema([(c, pa.float64() if c == "probability" else pa.string()) for c in cols])
        table = pa.table(cols, schema=schema)
        fd, tmp = tempfile.mkstemp(prefix=".part.", suffix=".tmp", dir=self.path)
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self.path / f"part-{uuid.uuid4().hex}.parquet")  # all or nothing
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._buffer = []

    def close(self) -> None:
        self._flush()


def _new_rows(written: set[Key], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` not written yet (a retried Ray task must never add a row twice)."""
    new = []
    for r in rows:
        k = row_key(r)
        if k not in written:
            written.add(k)
            new.append(r)
    return new


def open_sink(path: Path) -> Sink:
    """The resumable output for ``path`` (.jsonl or .parquet)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return JsonlSink(path)
    if suffix == ".parquet":
        return ParquetSink(path)
    raise ConfigError(f"{path.name}: distributed runs write .jsonl or .parquet (resumable)")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a .jsonl file or .parquet folder this module wrote (tests, scripts)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = []
        for part in sorted(path.glob("part-*.parquet")):
            col = pq.read_table(part, columns=["analysis"])["analysis"].to_pylist()
            rows += [json.loads(a) for a in col]
        return rows
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
