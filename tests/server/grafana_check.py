"""Check a Grafana dashboard (JSON) against the Prometheus text a live server exports.

Every PromQL expression in the dashboard (panel targets, annotations, template queries) is
read; each `kunlite:` series it selects must be exported under that exact name (`_bucket`,
`_sum`, `_count`, `_total` as exposed), the labels it matches on or groups by must be labels of
those series, and it must filter on `model_name="$model_name"`. Conversely, every `kunlite:`
family the server exports must be on the dashboard, so that a new metric gets a panel.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

SELECTOR = re.compile(r"(kunlite:[A-Za-z0-9_:]+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*[^,]+,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")
SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+\S+")
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="(?:[^"\\]|\\.)*"')
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def exported(text: str) -> tuple[dict[str, set[str]], dict[str, tuple[str, ...]]]:
    """(sample name -> its label names, family -> the sample names a dashboard may use)."""
    labels: dict[str, set[str]] = defaultdict(set)
    families: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            family = family.removesuffix("_total") if kind == "counter" else family
            families[family] = tuple(family + s for s in SUFFIXES.get(kind, ("",)))
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, line
            labels[match.group(1)].update(LABEL.findall(match.group(2) or ""))
    # prometheus_client's `_created` gauges (a counter's or histogram's start time) are no metric.
    for family in [f for f in families if f.endswith("_created") and f.removesuffix("_created") in families]:
        del families[family]
    return labels, families


def expressions(node: Any, where: str = "") -> list[tuple[str, str]]:
    """(where, PromQL) for every `expr`, and every template `query`/`definition`, in the JSON."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        name = node.get("title") or node.get("name") or where
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str) and value.strip():
                found.append((f"{name}.{key}", value))
            else:
                found += expressions(value, name)
    elif isinstance(node, list):
        for item in node:
            found += expressions(item, where)
    return found


def balanced(expr: str) -> bool:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    if text.count('"') % 2:
        return False
    depth = {"(": 0, "{": 0, "[": 0}
    closing = {")": "(", "}": "{", "]": "["}
    for c in text:
        if c in depth:
            depth[c] += 1
        elif c in closing:
            depth[closing[c]] -= 1
            if depth[closing[c]] < 0:
                return False
    return not any(depth.values())


def panels(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in node.get("panels", []):
        out.append(p)
        out += panels(p)  # a collapsed row holds its panels
    return out


def check_structure(dashboard: dict[str, Any]) -> None:
    """An importable dashboard in vLLM's style: a DS_PROMETHEUS input, a model_name variable."""
    assert {"name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}.items() <= \
        next(i for i in dashboard["__inputs"] if i["name"] == "DS_PROMETHEUS").items()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "model_name" in variables
    all_panels = panels(dashboard)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in all_panels:
        assert {"gridPos", "title", "type"} <= p.keys(), p.get("title")
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t.get("refId") and t.get("expr"), p["title"]
    assert sum(len(p.get("targets", [])) for p in all_panels) >= 20


def check_grafana_dashboard(path: Path, metrics_text: str) -> None:
    dashboard = json.loads(path.read_text())
    check_structure(dashboard)
    labels, families = exported(metrics_text)
    used: set[str] = set()
    problems: list[str] = []
    exprs = expressions(dashboard)
    assert exprs, "no expression in the dashboard"
    for where, expr in exprs:
        if not balanced(expr):
            problems.append(f"{where}: unbalanced brackets or quotes in {expr!r}")
        selected = SELECTOR.findall(expr)
        known: set[str] = set()
        for name, matchers in selected:
            used.add(name)
            if name not in labels:
                problems.append(f"{where}: {name} is not on /metrics")
                continue
            known |= labels[name]
            for label in MATCHER.findall(matchers):
                if label not in labels[name]:
                    problems.append(f"{where}: {name} has no label {label!r}")
            if not where.endswith((".query", ".definition")) and '"$model_name"' not in matchers:
                problems.append(f"{where}: {name} is not filtered on model_name=\"$model_name\"")
        grouped = [g.strip() for clause in GROUPING.findall(expr) for g in clause.split(",") if g.strip()]
        for label in grouped + LABEL_VALUES.findall(expr):
            if selected and label not in known:
                problems.append(f"{where}: no series in {expr!r} has the label {label!r}")
    missing = [f for f, names in families.items() if f.startswith("kunlite:") and not used & set(names)]
    if missing:
        problems.append(f"exported but on no panel: {sorted(missing)}")
    assert not problems, "\n".join(problems)
