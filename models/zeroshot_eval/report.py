"""The paper-style table: one row per dataset (grouped by category, in the study's order), one
column per (model, mode); accuracy and F1 in %, SAMSum as ROUGE-1/2/L."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smile.models.zeroshot_eval.tasks import TASKS


def collect(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every results file (``<task>.<mode>.json``) under ``out_dir``, any depth; its column is
    named by its folder under ``out_dir`` (the run name), so two models sit side by side."""
    root = Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"report: no results directory {root}")
    results = []
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and {"task", "mode", "scores", "protocol"} <= data.keys():
            data["run"] = str(path.parent.relative_to(root)) if path.parent != root else data["model"]
            results.append(data)
    if not results:
        raise FileNotFoundError(f"report: no results files under {root}")
    return results


def cell(result: dict[str, Any]) -> str:
    scores = result["scores"]
    if result["metric"] == "rouge":
        return "/".join(f"{100 * scores[k]:.1f}" for k in ("rouge1", "rouge2", "rougeL"))
    return f"{100 * scores[result['headline']]:.1f}"


def _run(result: dict[str, Any]) -> str:
    return result.get("run") or result["model"]


def format_table(results: list[dict[str, Any]]) -> str:
    """A markdown table of ``results``; a missing (task, column) is "-"."""
    columns = sorted({(_run(r), r["mode"]) for r in results}, key=lambda c: (c[0], c[1] != "zs"))
    cells = {(r["task"], _run(r), r["mode"]): cell(r) for r in results}
    order = [t for t in TASKS if any(r["task"] == t for r in results)]
    order += sorted({r["task"] for r in results} - set(order))
    head = ["category", "dataset", "metric", *(f"{m} {mode}" for m, mode in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in order:
        some = next(r for r in results if r["task"] == name)
        metric = {"accuracy": "acc", "entity_f1": "F1", "rouge": "R-1/2/L"}[some["metric"]]
        row = [some["category"], name, metric, *(cells.get((name, m, mode), "-") for m, mode in columns)]
        lines.append("| " + " | ".join(row) + " |")
    protocols = sorted({r["protocol"] for r in results})
    sizes = ", ".join(f"{t}={next(r['n'] for r in results if r['task'] == t)}" for t in order)
    lines.append(f"\nprotocol hash(es): {', '.join(protocols)}; n per task: {sizes}")
    return "\n".join(lines)


def report(out_dir: str | Path) -> str:
    return format_table(collect(out_dir))
