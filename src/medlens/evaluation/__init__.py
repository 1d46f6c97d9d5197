"""Evaluation: metric functions over arrays, bootstrap CIs, plots and named protocols.

>>> from medlens.evaluation.protocols import run_protocol
>>> from medlens.models import load_encoder
>>> res = run_protocol("derm7-isic2018", load_encoder("lite"), limit=100)
>>> res["balanced_accuracy"], res["balanced_accuracy_ci"]

``medlens eval PROTOCOL|all`` (``medlens/cli/evaluate.py``) runs them from the shell and writes
``<protocol>.json``, ``<protocol>.md`` and ``plots/``; ``protocols.yaml`` defines them.
"""
