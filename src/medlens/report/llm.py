"""An optional readability rewrite of the narrative by a language model, guarded.

``rewrite_narrative(report, url)`` sends the template narrative to an OpenAI-compatible
chat-completions endpoint (``POST {url}/chat/completions``) and returns the rewrite only
when ``grounding.check_grounding`` accepts it. Any failure — the endpoint down, slow
(``timeout_s`` bounds connecting and each read), an error status, an answer that is not the
expected JSON, or a rewrite that names anything the report does not — gives the
template narrative, with the reason recorded in ``rejected_because``. It never raises
for the endpoint's faults, and a silent endpoint costs at most ``timeout_s``.

Nothing calls it by default: the template narrative is the report's narrative.
"""

from __future__ import annotations

import httpx

from medlens.report.grounding import Grounded, grounded_narrative
from medlens.report.model import Report

__all__ = ["SYSTEM_PROMPT", "rewrite_narrative"]

SYSTEM_PROMPT = (
    "Rewrite the following decision-support summary of a medical image analysis so that a "
    "clinician reads it easily. Keep every finding name, probability, code and the triage "
    "level exactly as given; add no finding, code, number, side or diagnosis; remove "
    "nothing about the triage. Answer with the rewritten text only."
)


def rewrite_narrative(
    report: Report, url: str, *, model: str = "default", timeout_s: float = 10.0
) -> Grounded:
    """The grounded rewrite of ``report``'s narrative, or the template and why."""
    template = report.narrative_text
    body = {
        "model": model,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": template},
        ],
    }
    endpoint = url.rstrip("/") + "/chat/completions"
    timeout = httpx.Timeout(timeout_s)
    try:
        with httpx.Client(timeout=timeout) as client:
            r = client.post(endpoint, json=body)
        r.raise_for_status()
        text = r.json()["choices"][0]["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("content is not text")
    except httpx.TimeoutException:
        return Grounded(template, "template", (f"language model timed out after {timeout_s} s",))
    except httpx.HTTPError as exc:
        return Grounded(template, "template", (f"language model unavailable: {exc}",))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        why = f"language model answer not understood: {type(exc).__name__}"
        return Grounded(template, "template", (why,))
    return grounded_narrative(report, text)
