"""The validation report as one self-contained HTML page.

Everything is inline (plots and thumbnails as base64 PNG), so the page can be
attached to a CI run or mailed and still shows everything. Plots are drawn
with matplotlib's Agg backend (no display). File names come from users'
folders, so every string is escaped.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

from pipeline.core.preprocessing import ImageError, PreprocessSpec, pixels_for
from pipeline.validation.report_md import budget_lines, pct, summary_rows
from pipeline.validation.report_md import verdict as verdict_of

REFERENCE_COLOUR = "#1f77b4"
CANDIDATE_COLOUR = "#d62728"
MAX_THUMBNAILS = 48


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def img_tag(b64: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


MAX_PLOTTED_CLASSES = 30  # a 1000-class figure at full size took 20 GB in Agg; the JSON keeps every class


def _changed_most(names: list, rows: list, key) -> tuple[list, list]:
    """The classes that changed most, when there are too many to draw legibly."""
    if len(names) <= MAX_PLOTTED_CLASSES:
        return names, rows
    order = sorted(range(len(names)), key=lambda i: -key(rows[i]))[:MAX_PLOTTED_CLASSES]
    order.sort()
    return [names[i] for i in order], [rows[i] for i in order]


def per_class_plot(r: dict) -> str:
    plt = pyplot()
    names = list(r["per_class"])
    rows = list(r["per_class"].values())
    total = len(names)
    if r["per_class_by"] == "true label":
        names, rows = _changed_most(names, rows, lambda c: abs(c["top1_float"] - c["top1_quant"]))
    else:
        names, rows = _changed_most(names, rows, lambda c: 1.0 - c["agreement"])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 3.2))
    x = np.arange(len(names))
    if r["per_class_by"] == "true label":
        ax.bar(x - 0.2, [c["top1_float"] for c in rows], 0.4, label="reference", color=REFERENCE_COLOUR)
        ax.bar(x + 0.2, [c["top1_quant"] for c in rows], 0.4, label="candidate", color=CANDIDATE_COLOUR)
        ax.set_ylabel("top-1 accuracy")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.bar(x, [c["agreement"] for c in rows], 0.6, color=CANDIDATE_COLOUR)
        ax.set_ylabel("agreement")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(x, names, rotation=45 if len(names) > 12 else 0, ha="right" if len(names) > 12 else "center")
    shown = "" if len(names) == total else f", the {len(names)} of {total} classes that changed most"
    ax.set_title(f"per class (by {r['per_class_by']}{shown})")
    return png_base64(fig)


def layer_plot(r: dict, top: int = 15) -> str | None:
    layers = r.get("layers") or {}
    if layers.get("status") != "ok" or not layers["all"]:
        return None
    plt = pyplot()
    worst = layers["all"][:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(worst) + 1.2))
    ax.barh([f"{e['layer']} ({e['op']})" for e in worst], [e["rmse_over_scale"] for e in worst],
            color=CANDIDATE_COLOUR)
    ax.axvline(12 ** -0.5, color="#444444", linestyle="--", linewidth=1, label="rounding only (0.29)")
    ax.set_xlabel("RMSE / scale (accumulated)")
    ax.set_title(f"worst {len(worst)} layers")
    ax.legend(loc="lower right")
    return png_base64(fig)


def confidence_plot(r: dict, ref_conf=None, cand_conf=None) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    if ref_conf is not None and cand_conf is not None:
        bins = np.linspace(0, 1, 21)
        ax.hist(ref_conf, bins=bins, alpha=0.6, label="reference", color=REFERENCE_COLOUR)
        ax.hist(cand_conf, bins=bins, alpha=0.6, label="candidate", color=CANDIDATE_COLOUR)
    else:
        for key, colour in (("reference", REFERENCE_COLOUR), ("candidate", CANDIDATE_COLOUR)):
            h = r["confidence"][key]
            ax.stairs(h["counts"], h["edges"], fill=True, alpha=0.6, color=colour, label=key)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("images")
    ax.legend(loc="upper left")
    ax.set_title("confidence")
    return png_base64(fig)


def confusion_plot(r: dict) -> str:
    plt = pyplot()
    m = np.asarray(r["confusion_change"]["matrix"])
    names = list(r["data"]["classes"])
    if len(names) > MAX_PLOTTED_CLASSES:
        weight = np.abs(m).sum(0) + np.abs(m).sum(1)
        keep = np.sort(np.argsort(-weight, kind="stable")[:MAX_PLOTTED_CLASSES])
        m = m[np.ix_(keep, keep)]
        names = [names[i] for i in keep]
    size = max(4.0, 0.45 * len(names) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    limit = max(1, int(np.abs(m).max()))
    image = ax.imshow(m, cmap="RdBu_r", vmin=-limit, vmax=limit)
    if len(names) <= 30:
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
        for (i, j), v in np.ndenumerate(m):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if abs(v) > limit / 2 else "black")
    fig.colorbar(image, ax=ax, shrink=0.7)
    ax.set_title(r["confusion_change"]["kind"].split("(")[0].strip(), fontsize=9)
    return png_base64(fig)


def _thumbnail(path: str, size: int) -> str | None:
    try:
        pixels = pixels_for(path, PreprocessSpec(size=size))
    except (ImageError, ValueError):
        return None
    im = Image.fromarray(pixels)
    if size < 96:
        im = im.resize((96, 96), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def flips_section(r: dict) -> str:
    if not r["flips"]:
        return "<p>No prediction changed.</p>"
    size = int(r["preprocessing"]["size"])
    cells = []
    for f in r["flips"][:MAX_THUMBNAILS]:
        b64 = _thumbnail(f["path"], size)
        picture = img_tag(b64, f["path"], "thumb") if b64 else '<div class="missing">unreadable now</div>'
        label = f"label {html.escape(f['label'])}<br>" if f["label"] is not None else ""
        cells.append(f'<figure class="{html.escape(f["change"] or "moved")}">{picture}<figcaption>{label}'
                     f"ref {html.escape(f['reference'])} ({f['reference_confidence']:.2f})<br>"
                     f"cand {html.escape(f['candidate'])} ({f['candidate_confidence']:.2f})<br>"
                     f'<span class="path">{html.escape(f["path"])}</span></figcaption></figure>')
    more = (f"<p>{r['flips_total'] - MAX_THUMBNAILS} more in report.json.</p>"
            if r["flips_total"] > MAX_THUMBNAILS else "")
    return f'<div class="flips">{"".join(cells)}</div>{more}'


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1150px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.pass{color:#137333}.fail{color:#c5221f}.not-gated{color:#b06000}.plots img.plot{max-width:100%;margin:6px 0;display:block}
.flips{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:150px;font-size:11px;border:2px solid #ddd;padding:4px}
figure.broken{border-color:#d62728}figure.fixed{border-color:#2ca02c}.path{color:#777;word-break:break-all}
img.thumb{width:96px;height:96px;image-rendering:pixelated}
"""


def render_html(r: dict, *, ref_conf=None, cand_conf=None) -> str:
    esc = html.escape
    verdict = verdict_of(r)
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary_rows(r))
    budgets = "".join(f"<li>{esc(b)}</li>" for b in budget_lines(r))
    per_class = "".join(
        f"<tr><td>{esc(n)}</td><td>{c['n']}</td><td>{pct(c['top1_float'])}</td><td>{pct(c['top1_quant'])}</td>"
        f"<td>{'n/a' if c['drop_pp'] is None else format(c['drop_pp'], '+.2f')}</td><td>{pct(c['agreement'])}</td></tr>"
        for n, c in r["per_class"].items())
    plots = [img_tag(per_class_plot(r), "per-class drift"), img_tag(confidence_plot(r, ref_conf, cand_conf), "confidence"),
             img_tag(confusion_plot(r), "confusion change")]
    layer_png = layer_plot(r)
    layers = r.get("layers") or {}
    cand_mode = str(r["candidate"].get("mode") or r["candidate"]["kind"])
    layer_html = (img_tag(layer_png, "worst layers") + f"<p>{esc(layers['method'])}</p>" if layer_png
                  else f"<p>Per-layer errors {esc(layers.get('status', 'n/a'))}: {esc(layers.get('reason', ''))}</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xedge drift report</title><style>{_CSS}</style></head>
<body>
<h1>Drift report: <span class="{verdict.lower().replace(' ', '-')}">{verdict}</span></h1>
<p>candidate <code>{esc(r['candidate']['path'])}</code> ({esc(cand_mode)})
vs reference <code>{esc(r['reference']['path'])}</code> ({esc(r['reference']['kind'])}),
on {r['samples']} images from <code>{esc(r['data']['root'])}</code>.</p>
<ul>{budgets}</ul>
<table>{summary}</table>
<h2>Plots</h2><div class="plots">{''.join(plots)}</div>
<h2>Layers</h2><div class="plots">{layer_html}</div>
<h2>Per class</h2>
<table><tr><th>class</th><th>n</th><th>top-1 reference</th><th>top-1 candidate</th><th>drop (pp)</th>
<th>agreement</th></tr>{per_class}</table>
<h2>Flipped predictions ({r['flips_total']})</h2>{flips_section(r)}
<p class="path">preprocessing {esc(r['preprocessing']['fingerprint'])} &middot; reference sha256
{esc(r['reference']['sha256'])} &middot; candidate sha256 {esc(r['candidate']['sha256'])}
&middot; {esc(r['created'])}</p>
</body></html>
"""
