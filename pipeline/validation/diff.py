"""Several validation reports side by side: which conversion mode to ship.

Reports are compared as written (no model is run), so ``xedge diff`` needs no
TensorFlow. Reports made on different images or with different
preprocessing are still shown, with a warning: their numbers are not paired.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import artifacts
from pipeline.core.errors import DataError
from pipeline.validation.report_md import md_cell
from pipeline.validation.validate import read_report

COLUMNS = ("report", "candidate", "mode", "top-1", "drop (pp)", "95% CI", "agreement", "top-5 overlap", "KL mean",
           "size", "latency")


@dataclass
class Comparison:
    rows: list[dict]
    warnings: list[str] = field(default_factory=list)

    def cells(self) -> list[list[str]]:
        return [[row[c] for c in COLUMNS] for row in self.rows]


def _latency(r: dict, report_path: Path) -> str:
    """p50 latency from the report itself, or from a device bench result saved beside it as latency.json."""
    lat = r.get("latency_ms")
    beside = report_path.parent / "latency.json"
    if lat is None and beside.is_file():
        try:
            lat = json.loads(beside.read_text()).get("latency_ms")
        except (OSError, ValueError, AttributeError):
            return "unreadable latency.json"
    if isinstance(lat, (int, float)):
        return f"{lat:.2f} ms"
    if isinstance(lat, dict):
        for key in ("p50", "median", "mean"):
            if isinstance(lat.get(key), (int, float)):
                return f"{lat[key]:.2f} ms ({key})"
    return "-"


def _row(path: Path, r: dict) -> dict:
    def pct(v):
        return "-" if v is None else f"{v * 100:.2f}%"

    ci = r.get("top1_drop_ci95_pp")
    cand = r["candidate"]
    return {
        "report": path.parent.name or path.name,
        "candidate": Path(cand["path"]).name,
        "mode": str(cand.get("mode") or cand.get("kind") or "?"),
        "top-1": pct(r.get("top1_quant")),
        "drop (pp)": "-" if r.get("top1_drop_pp") is None else f"{r['top1_drop_pp']:+.2f}",
        "95% CI": "-" if not ci else f"{ci[0]:+.2f} .. {ci[1]:+.2f}",
        "agreement": pct(r.get("agreement")),
        "top-5 overlap": pct(r.get("top5_agreement")),
        "KL mean": f"{r['kl_mean']:.4g}",
        "size": f"{cand['bytes'] / 2**20:.2f} MiB",
        "latency": _latency(r, path),
    }


def compare(paths: list[str | os.PathLike]) -> Comparison:
    if not paths:
        raise DataError("give at least one report.json")
    reports = [(Path(p), read_report(p)) for p in paths]
    warnings = []
    fingerprints = {r["preprocessing"]["fingerprint"] for _, r in reports}
    if len(fingerprints) > 1:
        warnings.append("the reports used different preprocessing; their numbers are not comparable")
    data = {r["data"].get("images_sha256") or (r["data"]["root"], r["samples"]) for _, r in reports}
    if len(data) > 1:
        warnings.append("the reports were made on different images: their differences are not paired")
    refs = {r["reference"]["sha256"] for _, r in reports}
    if len(refs) > 1:
        warnings.append("the reports have different reference models")
    return Comparison([_row(p, r) for p, r in reports], warnings)


def render_markdown(comp: Comparison) -> str:
    lines = ["# Validation reports side by side", ""]
    lines += [f"> warning: {w}" for w in comp.warnings] + ([""] if comp.warnings else [])
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in comp.cells()]
    return "\n".join(lines) + "\n"


def render_html(comp: Comparison) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in comp.cells())
    warn = "".join(f'<p class="warn">warning: {html.escape(w)}</p>' for w in comp.warnings)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xedge diff</title><style>
body{{font-family:system-ui,sans-serif;margin:24px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;white-space:nowrap}}.warn{{color:#c5221f}}</style></head>
<body><h1>Validation reports side by side</h1>{warn}<table><tr>{head}</tr>{body}</table></body></html>
"""


def write_diff(comp: Comparison, *, html_path=None, md_path=None) -> list[Path]:
    written = []
    if html_path:
        written.append(artifacts.atomic_write_bytes(html_path, render_html(comp).encode()))
    if md_path:
        written.append(artifacts.atomic_write_bytes(md_path, render_markdown(comp).encode()))
    return written
