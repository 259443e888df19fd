"""The parity report as JSON and Markdown, written atomically; and the rows the terminal table shows."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import artifacts
from pipeline.core.errors import ArtifactError
from pipeline.validation.report_md import md_cell

MAX_ROWS = 200  # per-image rows in the Markdown (the JSON keeps them all): mismatches first


def summary_rows(report: dict) -> list[list[str]]:
    """One row per target: who, where, images, top-1 matches, largest difference, verdict."""
    rows = []
    for t in report["targets"]:
        tol = "" if t["tolerance"] is None else f" (tolerance {t['tolerance']:g})"
        rows.append([t["name"], t["runtime"], t["where"], str(t["images"]), f"{t['top1_matches']}/{t['images']}",
                     f"{t['max_diff']:g}{tol}", f"{t['identical_outputs']}/{t['images']}",
                     "PASS" if t["passed"] else "FAIL"])
    return rows


SUMMARY_COLUMNS = ["target", "runtime", "where", "images", "top-1 matches", "max difference", "identical outputs",
                   "verdict"]


def inputs_line(report: dict) -> str:
    i = report["inputs"]
    return (f"inputs: {i['used']} {i['what']}; interpreters got {i['convention']}; differences in {report['unit']}")


def near_ties_text(t: dict) -> str:
    """How many changed top-1s were near ties: the reference's margin within twice the output difference."""
    return (f"{t['mismatches_near_ties']} of {t['top1_mismatches']} where this machine's top-1 margin is at most "
            "twice the output difference: near ties")


def decoding_text(t: dict) -> str | None:
    """Decoder differences (a client decoding the files itself), said apart from the runtime's; never gated."""
    d = t.get("decoding")
    if not d:
        return None
    if not d["compared"]:
        return f"decoding: not compared: {d['not_compared']} files are {d['not_compared_why']}"
    changed = d["top1_changed"]
    names = ", ".join(Path(p).name for p in changed[:10]) + (" ..." if len(changed) > 10 else "")
    return (f"decoding (reported, not gated): with its own decoder top-1 changed on {len(changed)} of "
            f"{d['compared']} files" + (f" ({names})" if changed else "") + f", identical outputs on "
            f"{d['identical_outputs']}, largest difference {d['max_diff']:g} {d['unit']}"
            + (f"; {d['not_compared']} files not compared ({d['not_compared_why']})" if d["not_compared"] else ""))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]


def _target_section(t: dict) -> list[str]:
    lines = [f"## {md_cell(t['name'])}: {'PASS' if t['passed'] else 'FAIL'}", "",
             f"{md_cell(t['runtime'])}, {md_cell(t['where'])}; fed {md_cell(t['fed'])}.", "",
             f"Top-1 matches on {t['top1_matches']} of {t['images']} images; largest difference {t['max_diff']:g}, "
             f"mean {t['mean_diff']:g}; identical outputs on {t['identical_outputs']} images.", ""]
    if t["mismatched"]:
        lines += ["Top-1 differs on: " + ", ".join(f"`{md_cell(p)}`" for p in t["mismatched"]) +
                  f" ({near_ties_text(t)}).", ""]
    if t["over_tolerance"]:
        lines += [f"Difference over {t['tolerance']:g} on: " + ", ".join(f"`{md_cell(p)}`" for p in
                                                                           t["over_tolerance"]), ""]
    if decoding_text(t):
        lines += [md_cell(decoding_text(t)) + ".", ""]
    ordered = sorted(t["rows"], key=lambda r: (r["top1_match"], -r["max_diff"]))[:MAX_ROWS]
    rows = [[r["path"], r["label"] or "", r["reference"], r["target"], "yes" if r["top1_match"] else "NO",
             f"{r['max_diff']:g}", f"{r['reference_margin']:g}"] for r in ordered]
    header = ["image", "label", "this machine", "target", "top-1 match", "max difference", "reference top-1 margin"]
    more = ["", f"({len(t['rows']) - MAX_ROWS} more rows in the JSON report)"] if len(t["rows"]) > MAX_ROWS else []
    return lines + _table(header, rows) + more + [""]


def render_markdown(report: dict) -> str:
    m = report["model"]
    lines = [f"# Parity: {md_cell(m['path'])}", "", f"Verdict: **{'PASS' if report['passed'] else 'FAIL'}**", "",
             f"Model sha256 `{m['sha256'][:16]}`, input {m['input']['dtype']} {m['input']['shape']}, output "
             f"{m['output']['dtype']} {m['output']['shape']}.", "",
             md_cell(inputs_line(report)) + ".", "",
             f"Reference: {md_cell(report['reference']['runtime'])}, {md_cell(report['reference']['where'])}.", ""]
    lines += _table(SUMMARY_COLUMNS, summary_rows(report)) + [""]
    for t in report["targets"]:
        lines += _target_section(t)
    return "\n".join(lines)


def write_report(report: dict, path) -> list[Path]:
    """``x.json`` or ``x.md`` alone; any other path is a folder that receives parity.json and parity.md."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return [artifacts.atomic_write_json(path, report)]
    if suffix == ".md":
        return [artifacts.atomic_write_bytes(path, render_markdown(report).encode())]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot write the parity report into {path}: {exc.strerror or exc}") from None
    return [artifacts.atomic_write_json(path / "parity.json", report),
            artifacts.atomic_write_bytes(path / "parity.md", render_markdown(report).encode())]


__all__ = ["SUMMARY_COLUMNS", "decoding_text", "inputs_line", "near_ties_text", "render_markdown", "summary_rows", "write_report"]
