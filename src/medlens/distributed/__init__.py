"""Runs beyond one process: ``medlens index --ray`` and ``medlens analyze FOLDER --ray``.

``runtime`` connects to Ray (an optional extra, imported only when a run starts),
``ingest`` runs the case-library ingest's decode + embed step on Ray workers,
``analyze`` runs ``MedLens.analyze`` over a folder on them, and ``outputs`` holds the
folder rows and their resumable .jsonl / .parquet files. docs/ray.md says how to run
them on a cluster.
"""
