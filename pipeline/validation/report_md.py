"""The Markdown summary of a validation report: what a CI log or a pull request shows."""

from __future__ import annotations


def pct(v) -> str:
    return "n/a" if v is None else f"{v * 100:.2f}%"


def num(v, fmt=".4f") -> str:
    return "n/a" if v is None else format(v, fmt)


def md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_rows(r: dict) -> list[tuple[str, str]]:
    """(figure, value) pairs shared by the Markdown, the HTML and the terminal table."""
    rows = [("images", f"{r['samples']} ({r['data']['labels_source']})")]
    conventions = [str((r.get(m) or {}).get("input_convention") or "") for m in ("reference", "candidate")]
    if all(conventions):  # reports from before input conventions have none
        rows.append(("input convention reference / candidate", " / ".join(conventions)))
    approximation = (r.get("candidate") or {}).get("input_approximation")
    if approximation:
        rows.append(("input approximation (candidate)", approximation))
    outputs = r.get("outputs") or {}
    rows += [(f"{who} outputs", outputs[who]) for who in ("reference", "candidate") if who in outputs]
    if r.get("top1_float") is not None:
        lo, hi = r["top1_drop_ci95_pp"]
        rows += [("top-1 reference / candidate", f"{pct(r['top1_float'])} / {pct(r['top1_quant'])}"),
                 (f"top-{r['topk']} reference / candidate", f"{pct(r['top5_float'])} / {pct(r['top5_quant'])}"),
                 ("top-1 drop", f"{r['top1_drop_pp']:+.2f} pp (95% CI {lo:+.2f} .. {hi:+.2f})"),
                 ("McNemar exact p", f"{r['mcnemar']['p_value']:.3g} ({r['mcnemar']['reference_only_correct']} "
                                     f"only reference right, {r['mcnemar']['candidate_only_correct']} only candidate)")]
    rows += [("top-1 agreement", pct(r["agreement"])),
             (f"top-{r['topk']} overlap", pct(r["top5_agreement"])),
             ("KL(ref || cand) mean / max", f"{num(r['kl_mean'], '.4g')} / {num(r['kl_max'], '.4g')} nats"),
             ("probabilities: max abs diff / mean cosine",
              f"{num(r['prob_max_abs_diff'])} / {num(r['prob_cosine_mean'], '.5f')}"),
             ("flipped predictions", str(r["flips_total"]))]
    layers = r.get("layers") or {}
    if layers.get("status") == "ok":
        rows.append(("worst layers", ", ".join(layers["worst"][:3])))
    else:
        rows.append(("per-layer errors", f"{layers.get('status', 'n/a')}: {layers.get('reason', '')}"))
    runner = r.get("reference_runner")
    if runner:
        rows.append(("reference runner", f"{runner['runner']}: {runner['reason']}"))
    timing = r.get("timing") or {}
    if timing.get("images_per_s"):
        rows.append(("throughput", f"{timing['images_per_s']:.0f} images/s" + floor_text(timing.get("floor"))))
    return rows


def floor_text(floor: dict | None) -> str:
    """The machine's floor beside a measured rate (pipeline.validation.throughput)."""
    if not floor:
        return ""
    return (f" (this machine's floor {floor['images_per_s']:.0f} images/s: decode {floor['decode_ms']:.1f} + "
            f"reference {floor['reference_ms']:.1f} + candidate {floor['candidate_ms']:.1f} ms per image, "
            f"one per core on {floor['cores']} cores)")


def verdict(r: dict) -> str:
    """PASS/FAIL only when budgets were given: without them nothing was gated, whatever the numbers."""
    return "NOT GATED" if r.get("passed") is None else "PASS" if r["passed"] else "FAIL"


def budget_lines(r: dict) -> list[str]:
    if not r.get("budgets"):
        return ["no budgets given: nothing was gated"]
    return [f"{'PASS' if v['passed'] else 'FAIL'} {name}: {v['value']:.4g} (budget {v['limit']:.4g})"
            for name, v in r["budgets"].items()]


def int8_method_lines(methods: dict | None) -> list[str]:
    """The candidate's int8 methods (from its manifest): per layer, the error each changed, before and after."""
    if not methods:
        return []
    lines = ["", "## int8 methods", ""]
    if methods.get("ranges"):
        ranges = methods["ranges"]
        lines += [f"Activation ranges by {ranges['method']}: {ranges['clipped']} tensors clipped "
                  f"({ranges['seconds']:.1f} s).", ""]
    if methods.get("equalize"):
        equalized = methods["equalize"]
        seconds = f", {equalized['seconds']:.1f} s" if equalized.get("seconds") is not None else ""
        lines += [f"Cross-layer equalization: {equalized['pairs']} layer pairs balanced in {equalized['sweeps']} "
                  f"sweeps{seconds}.", ""]
    if methods.get("layers"):
        if methods.get("samples"):
            lines += [f"On {methods['samples']} calibration images, {methods['seconds']:.1f} s.", ""]
        lines += ["| method | layer | op | figure | before | after |", "|---|---|---|---|---|---|"]
        lines += [f"| {e['method']} | {md_cell(e['layer'])} | {e['op']} | {e['figure']} | {e['before']:.4g} | "
                  f"{e['after']:.4g} |" for e in methods["layers"]]
    return lines


def render_markdown(r: dict) -> str:
    lines = [f"# Drift: {md_cell(r['candidate']['path'])} vs {md_cell(r['reference']['path'])}", "",
             f"Verdict: **{verdict(r)}**", ""]
    lines += [f"- {md_cell(b)}" for b in budget_lines(r)] + ["", "| figure | value |", "|---|---|"]
    lines += [f"| {md_cell(k)} | {md_cell(v)} |" for k, v in summary_rows(r)]
    lines += ["", "## Per class", "", f"By {r['per_class_by']}.", "",
              "| class | n | top-1 reference | top-1 candidate | drop (pp) | agreement |", "|---|---|---|---|---|---|"]
    for name, c in r["per_class"].items():
        drop = "n/a" if c["drop_pp"] is None else f"{c['drop_pp']:+.2f}"
        lines.append(f"| {md_cell(name)} | {c['n']} | {pct(c['top1_float'])} | {pct(c['top1_quant'])} | {drop} "
                     f"| {pct(c['agreement'])} |")
    layers = r.get("layers") or {}
    if layers.get("status") == "ok":
        lines += ["", "## Worst layers", "", layers["method"], "", "| layer | op | RMSE / scale | max abs error |",
                  "|---|---|---|---|"]
        lines += [f"| {md_cell(e['layer'])} | {e['op']} | {e['rmse_over_scale']:.3f} | {e['max_abs_error']:.4g} |"
                  for e in layers["all"][:15]]
    lines += int8_method_lines(r["candidate"].get("int8_methods"))
    if r["flips"]:
        lines += ["", f"## Flipped predictions ({r['flips_total']})", "",
                  "| image | label | reference | candidate | change |", "|---|---|---|---|---|"]
        lines += [f"| {md_cell(f['path'])} | {md_cell(f['label'] or '')} | {md_cell(f['reference'])} "
                  f"({f['reference_confidence']:.2f}) | {md_cell(f['candidate'])} ({f['candidate_confidence']:.2f}) "
                  f"| {f['change'] or ''} |" for f in r["flips"][:50]]
    lines += ["", f"Preprocessing fingerprint `{r['preprocessing']['fingerprint']}`; reference sha256 "
              f"`{r['reference']['sha256'][:16]}`, candidate sha256 `{r['candidate']['sha256'][:16]}`.", ""]
    return "\n".join(lines)
