"""Clinical knowledge packs: findings, prompts, codes, risk and descriptions as data.

>>> from medlens.knowledge import load_domain
>>> derm = load_domain("dermatology")
>>> derm.finding("melanoma").risk
'urgent'
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import yaml

from medlens.errors import ConfigError
from medlens.knowledge.schema import RISK_ORDER, Description, Domain, Finding

DOMAINS: tuple[str, ...] = ("dermatology", "chest_xray")

__all__ = [
    "DOMAINS",
    "RISK_ORDER",
    "Description",
    "Domain",
    "Finding",
    "KnowledgePack",
    "load_domain",
    "pack_hash",
]


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

    def knows_label(self, vocab: str, label: str) -> bool:
        key = label.strip().casefold()
        return (vocab, key) in self._by_label or key in {
            x.casefold() for x in self.domain.unlabelled.get(vocab, ())
        }


def pack_hash(domain_id: str) -> str:
    import hashlib

    return hashlib.sha256(_read(domain_id).encode()).hexdigest()[:16]


def _read(domain_id: str) -> str:
    if domain_id not in DOMAINS:
        raise ConfigError(f"unknown domain {domain_id!r}; choose one of {', '.join(DOMAINS)}")
    return resources.files("medlens.knowledge").joinpath(f"{domain_id}.yaml").read_text("utf-8")


@cache
def load_domain(domain_id: str) -> KnowledgePack:
    """Load and validate one knowledge pack (cached; packs are immutable)."""
    raw = yaml.safe_load(_read(domain_id))
    try:
        domain = Domain.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError: make the file name explicit
        raise ConfigError(f"knowledge pack {domain_id}.yaml is invalid: {exc}") from exc
    return KnowledgePack(domain, pack_hash(domain_id))
