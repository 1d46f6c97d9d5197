"""Triage: a risk level and its reason from scored findings and the packs' risk levels.

A finding raises the triage to its own risk level when its probability reaches the
threshold for that level. Thresholds are data (each pack's ``triage_thresholds``) until a model
ships per-finding thresholds chosen for sensitivity (``thresholds`` argument), which
then take precedence. The highest level reached wins, whatever the top-1 finding is:
a 30 % melanoma under a 60 % naevus is still urgent.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medlens.knowledge import RISK_ORDER, KnowledgePack, load_domain
from medlens.knowledge.schema import Risk


class Triage(BaseModel):
    """The triage of one image (the ``triage`` object of the analysis JSON)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", json_schema_serialization_defaults_required=True
    )

    level: Risk
    reason: str
    triggered_by: tuple[str, ...] = Field(default=(), description="finding ids that set the level")
    next_step: str = ""
    review: bool = Field(
        default=False,
        description="image and clinical context disagree: review both before acting",
    )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def level_thresholds(domain_id: str) -> dict[str, float]:
    """Probability at which a finding of each risk level raises the triage, per domain
    (the pack's ``triage_thresholds``)."""
    return dict(load_domain(domain_id).domain.triage_thresholds)


def triage(
    pack: KnowledgePack,
    probabilities: dict[str, float],
    thresholds: dict[str, float] | None = None,
) -> Triage:
    """Decide the triage level for one image.

    ``probabilities``: finding id → probability. ``thresholds``: optional per-finding
    thresholds (e.g. chosen on validation for 0.90 sensitivity) overriding the policy.
    """
    per_level = level_thresholds(pack.id)
    thresholds = thresholds or {}
    hits: list[tuple[int, float, str, float]] = []
    for fid, p in probabilities.items():
        finding = pack.finding(fid)
        if finding.risk == "routine":
            continue
        t = thresholds.get(fid, per_level[finding.risk])
        if p >= t:
            hits.append((RISK_ORDER[finding.risk], p, fid, t))
    if not hits:
        top = max(probabilities, key=probabilities.get) if probabilities else None
        reason = "no urgent or soon finding reached its threshold"
        if top is not None:
            reason += f"; most likely: {pack.finding(top).name} ({probabilities[top]:.0%})"
        return Triage(
            level="routine",
            reason=reason,
            next_step="Routine review; reassess if the lesion or symptoms change.",
        )
    hits.sort(reverse=True)
    best_rank = hits[0][0]
    level = next(k for k, v in RISK_ORDER.items() if v == best_rank)
    top_hits = [h for h in hits if h[0] == best_rank]
    parts = [
        f"{pack.finding(fid).name} {p:.0%} ≥ threshold {t:.0%}" for _, p, fid, t in top_hits[:3]
    ]
    reason = f"{level} finding(s) above threshold: " + "; ".join(parts)
    return Triage(
        level=level,
        reason=reason,
        triggered_by=tuple(fid for _, _, fid, _ in top_hits),
        next_step=pack.finding(top_hits[0][2]).next_step,
    )
