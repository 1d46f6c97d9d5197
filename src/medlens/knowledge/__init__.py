"""Clinical knowledge packs: findings, prompts, codes, risk and descriptions as data.

>>> from medlens.knowledge import load_domain
>>> derm = load_domain("dermatology")
>>> derm.finding("melanoma").risk
'urgent'
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path

from medlens import _yaml
from medlens.errors import ConfigError
from medlens.knowledge.schema import RISK_ORDER, Description, Domain, Finding

__all__ = [
    "RISK_ORDER",
    "Description",
    "Domain",
    "Finding",
    "KnowledgePack",
    "domains",
    "load_domain",
    "pack_hash",
    "training_datasets",
    "use_pack_dirs",
]

# Folders of extra packs (``MEDLENS_KNOWLEDGE_PATH``), set by the entry points.
_extra_dirs: tuple[Path, ...] = ()


def use_pack_dirs(dirs: Sequence[Path | str]) -> None:
    """Discover packs in ``dirs`` too (after the packaged ones). Entry points call this
    with ``Settings.knowledge_dirs``; a pack there may not reuse a packaged id."""
    global _extra_dirs
    new = tuple(Path(d).expanduser() for d in dirs)
    if new != _extra_dirs:
        _extra_dirs = new
        _sources.cache_clear()
        load_domain.cache_clear()
        domains.cache_clear()


@cache
def _sources() -> dict[str, str]:
    """Pack id (file stem) → YAML text, packaged packs first."""
    out: dict[str, str] = {}
    builtin = resources.files("medlens.knowledge")
    for entry in sorted(builtin.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = entry.read_text("utf-8")
    for folder in _extra_dirs:
        if not folder.is_dir():
            raise ConfigError(f"knowledge pack folder {folder} does not exist")
        for path in sorted(folder.glob("*.yaml")):
            if path.stem in out:
                raise ConfigError(f"knowledge pack {path} reuses the domain id {path.stem!r}")
            out[path.stem] = path.read_text("utf-8")
    return out


@cache
def domains() -> tuple[str, ...]:
    """Every domain id, discovered from the ``*.yaml`` packs, in the packs' ``order``."""
    ids = list(_sources())
    return tuple(sorted(ids, key=lambda d: (load_domain(d).domain.order, ids.index(d))))


class KnowledgePack:
    """A validated `Domain` plus the lookups every caller needs (by id, by dataset label)."""

    def __init__(self, domain: Domain, source_hash: str):
        self.domain = domain
        self.source_hash = source_hash
        self._by_id = {f.id: f for f in domain.findings}
        self._by_label: dict[tuple[str, str], str] = {}
        for f in domain.findings:
            for vocab, names in f.labels.items():
                for name in names:
                    key = (vocab, name.casefold())
                    if key in self._by_label and self._by_label[key] != f.id:
                        raise ConfigError(
                            f"{domain.id}: label {vocab}:{name!r} maps to both "
                            f"{self._by_label[key]!r} and {f.id!r}"
                        )
                    self._by_label[key] = f.id

    # Convenience pass-throughs so callers can treat a pack like its Domain.
    @property
    def id(self) -> str:
        return self.domain.id

    @property
    def task(self) -> str:
        return self.domain.task

    @property
    def findings(self) -> tuple[Finding, ...]:
        return self.domain.findings

    @property
    def finding_ids(self) -> list[str]:
        return [f.id for f in self.domain.findings]

    @property
    def exclusions(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """(finding index, indices it cannot co-occur with) for every finding that
        declares ``excludes``: the data ``scoring.consistent`` applies."""
        idx = {f: i for i, f in enumerate(self.finding_ids)}
        return tuple(
            (idx[f.id], tuple(idx[g] for g in self.domain.excluded_by(f.id)))
            for f in self.domain.findings
            if f.excludes
        )

    def finding(self, finding_id: str) -> Finding:
        try:
            return self._by_id[finding_id]
        except KeyError:
            raise ConfigError(
                f"unknown finding {finding_id!r} in domain {self.domain.id!r}"
            ) from None

    def map_label(self, vocab: str, label: str) -> str | None:
        """Finding id for a dataset label, or None when the label is declared unlabelled.

        Raises ConfigError for a label the pack does not know: silent drops would bias
        every metric computed on that dataset.
        """
        fid = self._by_label.get((vocab, label.strip().casefold()))
        if fid is not None:
            return fid
        unl = {x.casefold() for x in self.domain.unlabelled.get(vocab, ())}
        if label.strip().casefold() in unl:
            return None
        raise ConfigError(f"{self.domain.id}: dataset label {vocab}:{label!r} maps to no finding")

    def findings_for(
        self, vocab: str, labels: Iterable[str], *, unknown: str = "raise"
    ) -> list[str]:
        """The finding ids of a record's dataset ``labels`` (in vocabulary ``vocab``):
        in label order, without repeats, declared-unlabelled labels dropped. The ONE
        label → finding mapping every loader, metric, calibration and index uses.

        ``unknown="raise"`` (default) refuses a label the pack does not know; ``"skip"``
        drops it (a case library keeps such labels as text, unmapped).
        """
        out: list[str] = []
        for lab in labels:
            if unknown == "skip" and not self.knows_label(vocab, lab):
                continue
            fid = self.map_label(vocab, lab)
            if fid is not None and fid not in out:
                out.append(fid)
        return out

    def candidates(self, vocab: str, labels: Iterable[str]) -> list[str]:
        """Findings a dataset's label set maps to, in the pack's order (the classes of a
        differential restricted to that dataset)."""
        mapped = set(self.findings_for(vocab, labels))
        return [f for f in self.finding_ids if f in mapped]

    def knows_label(self, vocab: str, label: str) -> bool:
        key = label.strip().casefold()
        return (vocab, key) in self._by_label or key in {
            x.casefold() for x in self.domain.unlabelled.get(vocab, ())
        }


def training_datasets() -> tuple[str, ...]:
    """The datasets the default model is trained and calibrated on: every pack's
    ``training_datasets``, in domain order."""
    return tuple(d for dom in domains() for d in load_domain(dom).domain.training_datasets)


def pack_hash(domain_id: str) -> str:
    return hashlib.sha256(_read(domain_id).encode()).hexdigest()[:16]


def _read(domain_id: str) -> str:
    sources = _sources()
    if domain_id not in sources:
        raise ConfigError(f"unknown domain {domain_id!r}; choose one of {', '.join(sources)}")
    return sources[domain_id]


@cache
def load_domain(domain_id: str) -> KnowledgePack:
    """Load and validate one knowledge pack (cached; packs are immutable)."""
    raw = _yaml.safe_load(_read(domain_id))
    try:
        domain = Domain.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError: make the file name explicit
        raise ConfigError(f"knowledge pack {domain_id}.yaml is invalid: {exc}") from exc
    if domain.id != domain_id:
        raise ConfigError(f"knowledge pack {domain_id}.yaml declares id {domain.id!r}")
    return KnowledgePack(domain, pack_hash(domain_id))
