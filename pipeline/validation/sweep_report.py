"""The sweep table as Markdown and as one self-contained HTML page (plots inline as base64 PNG).

The scatter puts accuracy against latency so the modes on the Pareto front
stand out at a glance; the bars show what each mode costs on disk.
"""

from __future__ import annotations

import html

from pipeline.validation.report_html import img_tag, png_base64, pyplot

COLUMNS = ("mode", "size (MiB)", "top-1", "drop (pp)", "agreement", "p50 (ms)", "p90 (ms)", "float layers", "note")


def _cells(row: dict) -> list[str]:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    return [row["mode"], f"{row['bytes'] / 2**20:.2f}", num(row["top1"], ".4f"), num(row["top1_drop_pp"], "+.2f"),
            num(row["agreement"], ".4f"), num(row["p50_ms"], ".3f"), num(row["p90_ms"], ".3f"),
            str(len(row["float_layers"])), row["note"]]


def table_rows(record: dict) -> list[list[str]]:
    return [_cells(r) for r in record["rows"]]


def render_markdown(record: dict) -> str:
    lines = [f"# Conversion sweep of {record['model']['path']}", "",
             f"{record['eval']['images']} eval images from `{record['eval']['folder']}`; fallback budget "
             f"{record['budget_top1_drop_pp']:g} pp.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in table_rows(record)]
    return "\n".join(lines) + "\n"


def scatter_plot(record: dict) -> str | None:
    rows = [r for r in record["rows"] if r["p50_ms"] is not None and r["top1"] is not None]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        ax.scatter(r["p50_ms"], r["top1"] * 100, s=40 + r["bytes"] / 2**20 * 20, alpha=0.7)
        ax.annotate(r["mode"], (r["p50_ms"], r["top1"] * 100), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("latency p50 (ms, lower is better)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("accuracy vs latency (marker area ~ size)")
    ax.grid(alpha=0.3)
    return png_base64(fig)


def size_plot(record: dict) -> str:
    plt = pyplot()
    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(rows) + 1))
    ax.barh([r["mode"] for r in rows], [r["bytes"] / 2**20 for r in rows], color="#1f77b4")
    ax.invert_yaxis()
    ax.set_xlabel("size (MiB)")
    ax.set_title("model size")
    return png_base64(fig)


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,td:last-child{text-align:left}
img.plot{max-width:100%;margin:0.5em}"""


def render_html(record: dict) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells[:-1])
                   + f"<td>{esc(cells[-1])} <a href=\"{esc(row['report'])}\">report</a></td></tr>"
                   for cells, row in zip(table_rows(record), record["rows"]))
    scatter = scatter_plot(record)
    plots = ([img_tag(scatter, "accuracy vs latency")] if scatter else []) + [img_tag(size_plot(record), "model size")]
    layers = "".join(f"<li>{esc(r['mode'])}: {esc(', '.join(r['float_layers']))}</li>"
                     for r in record["rows"] if r["float_layers"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xedge sweep</title><style>{_CSS}</style></head>
<body>
<h1>Conversion sweep</h1>
<p>model <code>{esc(record['model']['path'])}</code>; {record['eval']['images']} eval images from
<code>{esc(record['eval']['folder'])}</code>; fallback budget {record['budget_top1_drop_pp']:g} pp.</p>
<table><tr>{head}</tr>{body}</table>
<div class="plots">{''.join(plots)}</div>
{f'<h2>Layers kept in float</h2><ul>{layers}</ul>' if layers else ''}
<p class="path">{esc(record['created'])}</p>
</body></html>
"""
