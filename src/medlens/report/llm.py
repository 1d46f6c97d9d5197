"""An optional readability rewrite of the narrative by a language model, guarded.

``rewrite_narrative(report, url)`` sends the template narrative to an OpenAI-compatible
chat-completions endpoint (``POST {url}/chat/completions``) and returns the rewrite only
when ``grounding.check_grounding`` accepts it. Any failure — the endpoint down, slow
(``timeout_s`` bounds connecting and each read), an error status, an answer that is not the
expected JSON, or a rewrite that names anything the report does not — gives the
template narrative, with the reason recorded in ``rejected_because``. It never raises
for the endpoint's faults, and a silent endpoint costs at most ``timeout_s``.

``report.compose.compose_report`` calls it when MEDLENS_LLM_URL is set
(``Settings.llm_url``); otherwise the template narrative is the report's narrative.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx

from medlens.report.grounding import Grounded, grounded_narrative
from medlens.report.model import Report

__all__ = ["SYSTEM_PROMPT", "rewrite_narrative"]

# The whole call (connect, send, every read) ends within timeout_s + this margin, even
# when an endpoint trickles its answer a byte at a time (httpx's timeouts are per read).
DEADLINE_MARGIN_S = 1.0

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
    outcome: dict[str, Any] = {}

    def call() -> None:  # in a daemon thread: a trickling endpoint cannot hold the caller
        try:
            with httpx.Client(timeout=httpx.Timeout(timeout_s), trust_env=False) as client:
                r = client.post(endpoint, json=body)
            r.raise_for_status()
            outcome["text"] = r.json()["choices"][0]["message"]["content"]
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=call, name="medlens-llm", daemon=True)
    worker.start()
    worker.join(timeout_s + DEADLINE_MARGIN_S)
    exc = outcome.get("error")
    text = outcome.get("text")
    if worker.is_alive() or isinstance(exc, httpx.TimeoutException):
        return Grounded(template, "template", (f"language model timed out after {timeout_s} s",))
    if isinstance(exc, httpx.HTTPError):
        why = f"language model unavailable: {type(exc).__name__}"
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return Grounded(template, "template", (why + (f" {status}" if status else ""),))
    if exc is not None or not isinstance(text, str):
        name = type(exc).__name__ if exc is not None else "content is not text"
        return Grounded(template, "template", (f"language model answer not understood: {name}",))
    return grounded_narrative(report, text)
