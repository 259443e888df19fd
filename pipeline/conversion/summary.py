"""How a conversion reads to a person: the rows of its summary, and the outcome of an accuracy-budget search.

Kept with the records they read (``ExportResult.summary`` and the manifest's ``float_fallback`` section), so
that a front end prints these rows instead of knowing the records' keys; nothing here names a command-line
flag.
"""

from __future__ import annotations

from pipeline.core.preprocessing import InputConvention

INPUT_DESCRIPTIONS = {InputConvention.PIXELS: "RGB pixels 0..255 (uint8, or float32 on a float input)",
                      InputConvention.PIXELS_INT8: "int8 pixels p - 128 (scale 1, zero point -128)",
                      InputConvention.SIGNED_UNIT: "[-1, 1]: p / 127.5 - 1 (quantized on an integer input)"}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """(name, value) rows of a conversion's summary, in the order a reader scans them."""
    rows = [("mode", str(summary["mode"]))]
    convention = summary.get("input_convention")
    if convention:
        rows.append(("input", INPUT_DESCRIPTIONS.get(convention, convention)))
    rows += [("output", str(summary["output"])),
             ("size", f"{_mib(summary['source_bytes'])} -> {_mib(summary['output_bytes'])}"),
             ("ops int / float", f"{summary['int_ops']} / {summary['float_ops']}")]
    if summary.get("calibration_samples"):
        rows.append(("calibration images", str(summary["calibration_samples"])))
    partitions = summary["xnnpack_partitions"]
    rows.append(("XNNPACK partitions", "unknown" if partitions is None else str(partitions) + (
        " (XNNPACK refuses the model)" if summary.get("xnnpack_refused")
        else " (one is best)" if partitions > 1 else "")))
    rows.append(("time", f"{summary['seconds']:.1f} s"))
    return rows


def fallback_summary(section: dict) -> dict:
    """The figures of a budget search worth a line of JSON, from the manifest's ``float_fallback`` section."""
    return {"float_fallback": section["layers"], "fallback_method": section["method"],
            "kept_in": section["kept_in"], "final_top1_drop_pp": section["final_top1_drop_pp"],
            "heldout_top1_drop_pp": section["heldout_top1_drop_pp"],
            "heldout_top1_drop_ci95_pp": section["heldout_top1_drop_ci95_pp"], "latency": section["latency"]}


def fallback_lines(section: dict) -> list[str]:
    """What a budget search reached, in words: the drop (held out, and on the search's images), the layers kept
    out of int8, and the latency they cost."""
    layers = ", ".join(section["layers"]) or "none needed"
    evals = section["eval"]
    if section["heldout"] is not None:
        lo, hi = section["heldout_top1_drop_ci95_pp"]
        drop = (f"top-1 drop {section['heldout_top1_drop_pp']:.2f} pp on {evals['heldout_images']} held-out images "
                f"(95% CI {lo:.2f} to {hi:.2f}), {section['final_top1_drop_pp']:.2f} pp on the "
                f"{evals['search_images']} images the search used")
    else:
        drop = (f"top-1 drop {section['final_top1_drop_pp']:.2f} pp on the {evals['search_images']} images the "
                f"search used ({evals['holdout']})")
    lines = [f"{drop} (budget {section['budget_top1_drop_pp']:g} pp); {section['kept_in']} layers: {layers}"]
    latency = section["latency"]
    if latency:
        lines.append(f"latency cost of the fallback (local, p50): {latency['all_quantized_p50_ms']:.3f} ms -> "
                     f"{latency['with_fallback_p50_ms']:.3f} ms (x{latency['ratio_p50']:.2f})")
    return lines
