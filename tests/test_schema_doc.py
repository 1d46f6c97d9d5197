"""docs/analysis.md, the ``Analysis`` model and ``/openapi.json`` describe the same JSON."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from medlens.analysis.result import Analysis
from medlens.config import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "analysis.md"


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _allows_null(node: dict[str, Any]) -> bool:
    return node.get("type") == "null" or any(o.get("type") == "null" for o in node.get("anyOf", []))


def schema_fields(schema: dict[str, Any]) -> dict[str, bool]:
    """Every field of the JSON by path (``a.b``; ``a[].b`` inside lists) → nullable."""
    out: dict[str, bool] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        node = _resolve(schema, node)
        for option in node.get("anyOf", []):
            walk(option, prefix)
        if node.get("type") == "array" and "items" in node:
            walk(node["items"], f"{prefix}[]")
        for name, sub in node.get("properties", {}).items():
            path = f"{prefix}.{name}" if prefix else name
            out[path] = _allows_null(sub)
            walk(sub, path)

    walk(schema, "")
    return out


def documented_fields(text: str) -> dict[str, str]:
    """Field path → its type cell, from every table of the doc whose first column is
    ``field`` (a cell may name several fields)."""
    out: dict[str, str] = {}
    in_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0] == "field":
            in_table = True
        elif in_table and not set(cells[0]) <= {"-", ":"}:
            for name in re.findall(r"`([^`]+)`", cells[0]):
                assert name not in out, f"{name} is documented twice"
                out[name] = cells[1]
    return out


def test_doc_lists_exactly_the_fields_of_the_model() -> None:
    fields = schema_fields(Analysis.model_json_schema(mode="serialization"))
    documented = documented_fields(DOC.read_text("utf-8"))
    assert len(fields) > 60 and {"findings[].probability", "similar_cases[].similarity"} <= set(
        fields
    )
    missing = sorted(set(fields) - set(documented))
    unknown = sorted(set(documented) - set(fields))
    assert not missing, f"fields of the Analysis model not in docs/analysis.md: {missing}"
    assert not unknown, f"fields in docs/analysis.md the Analysis model does not have: {unknown}"
    wrong_null = sorted(p for p, null in fields.items() if null != ("null" in documented[p]))
    assert not wrong_null, f"docs/analysis.md says null (or not) wrongly for: {wrong_null}"


def test_doc_parser_sees_a_missing_or_extra_field() -> None:
    text = "| field | type | meaning |\n|---|---|---|\n| `a`, `b.c` | x \\| null | y |\n"
    assert documented_fields(text) == {"a": "x \\| null", "b.c": "x \\| null"}
    assert documented_fields("| name | type |\n|---|---|\n| `a` | x |\n") == {}


@pytest.fixture()
def openapi(tmp_path: Path) -> dict[str, Any]:
    from medlens.api.app import create_app

    app = create_app(Settings(home=tmp_path))  # no lifespan: the model is never loaded
    return TestClient(app).get("/openapi.json").json()


def test_openapi_declares_the_analysis_response(openapi: dict[str, Any]) -> None:
    components = openapi["components"]["schemas"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = components[node["$ref"].rsplit("/", 1)[-1]]
        return node

    ok = openapi["paths"]["/v1/analyze"]["post"]["responses"]["200"]
    body = resolve(ok["content"]["application/json"]["schema"])
    props = body["properties"]
    assert {"findings", "triage", "similar_cases"} <= set(body["required"])
    finding = resolve(props["findings"]["items"])
    assert {"id", "name", "probability", "icd10", "snomed", "risk"} <= set(finding["properties"])
    assert set(resolve(props["triage"])["properties"]) == {
        "level", "reason", "triggered_by", "next_step", "review"
    }  # fmt: skip
    case = resolve(props["similar_cases"]["items"])
    assert {"case_id", "similarity", "labels", "point_id"} <= set(case["properties"])
    # The same fields as the model's own serialization schema, hence as docs/analysis.md.
    assert set(props) == set(Analysis.model_json_schema(mode="serialization")["properties"])
