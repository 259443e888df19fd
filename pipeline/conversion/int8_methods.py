"""Post-training methods applied to a quantized int8 model before anything else sees it: learned weight rounding,
then bias correction, both on the calibration images.

Why here: the quantizer's output is the one place every int8 conversion of
this project passes through (``export._staged_int8``: plain ``--int8``, each
``--max-drop`` candidate, the sweep), so what is measured, searched and
written is the same refined model. Both methods only rewrite constant
buffers of the int8 model (``pipeline.tflite.weighted_layers``): same graph,
same ops, same scales, so the XNNPACK partitions and the device's arithmetic
are those of the unrefined model, and ``validate`` runs exactly these bytes.

Rounding goes first: bias correction then measures the mean shift of the
model with its final weights.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pipeline.conversion.settings import ConvertSettings, Progress, Ranges, Rounding
from pipeline.tflite.activation_ranges import mse_ranges
from pipeline.tflite.bias_correction import correct_biases
from pipeline.tflite.weight_rounding import learn_rounding
from pipeline.tflite.weighted_layers import InputSums

# The calibration images learned rounding sees (the first ones of the stratified sample: every class in turn):
# its cost grows with this number, and second moments over every output position of 64 images are already
# stable. Bias correction sees every calibration image: its float means come from the calibration's own pass
# (``InputSums``), so each image costs it one piecewise int8 run, and on real models the means of all 200
# default images correct more than those of 64 (measured in docs/validation.md).
ROUNDING_SAMPLES = 64


def chosen_ranges(calibrated: bytes, samples, settings: ConvertSettings, record: dict,
                  progress: Progress | None = None) -> bytes:
    """The calibrated float model with the activation ranges ``settings.ranges`` asks for (``samples()``: a fresh
    iterable of input batches, the calibration images); ``record["ranges"]`` says what was clipped, and
    ``progress`` hears each image the range search has counted."""
    if settings.ranges == Ranges.MINMAX:
        return calibrated
    calibrated, report = mse_ranges(calibrated, samples(), progress=_named(progress, "choosing the activation ranges"))
    record["ranges"] = report.to_dict()
    return calibrated


def refine_int8(quantized: bytes, float_model: bytes, representative, settings: ConvertSettings,
                record: dict, float_sums: InputSums | None = None, progress: Progress | None = None) -> bytes:
    """``quantized`` with the methods ``settings`` asks for; ``record["int8_methods"]`` says what each changed.

    ``float_sums``: the float model's layer inputs summed over the calibration images by the calibration
    itself; bias correction runs the float model for them where they are missing. ``progress`` hears each
    method's steps under its name.
    """
    if not settings.int8_methods:
        return quantized
    t0 = time.perf_counter()
    inputs = [representative.inputs(i) for i in range(len(representative))]
    reports = []
    if settings.rounding == Rounding.LEARNED:
        quantized, rounding = learn_rounding(quantized, float_model, inputs[:ROUNDING_SAMPLES],
                                             progress=_named(progress, "learning the weight rounding"))
        reports.append(rounding.to_dict())
    if settings.bias_correction:
        quantized, bias = correct_biases(quantized, float_model, inputs, float_sums=float_sums,
                                         progress=_named(progress, "correcting the biases"))
        reports.append(bias.to_dict())
    samples = max(int(report["samples"]) for report in reports)
    record["int8_methods"] = {"rounding": str(settings.rounding), "bias_correction": bool(settings.bias_correction),
                              "samples": samples, "seconds": round(time.perf_counter() - t0, 3), "methods": reports}
    return quantized


def _named(progress: Progress | None, step: str) -> Callable[[int, int], None] | None:
    return None if progress is None else lambda done, total: progress(done, total, step)


def combined(earlier: dict | None, later: dict) -> dict:
    """Two ``int8_methods`` records of one model as one (a spliced model: rounding on the host, bias correction
    after the splice), the earlier method first."""
    if not earlier:
        return later
    return {"rounding": earlier["rounding"], "bias_correction": later["bias_correction"],
            "samples": max(earlier["samples"], later["samples"]),
            "seconds": round(earlier["seconds"] + later["seconds"], 3),
            "methods": earlier["methods"] + later["methods"]}


def summary(calibration: dict) -> dict:
    """What the int8 methods of a manifest's calibration record changed, for the drift report: per method its
    time and, per layer, the output error before and after (rounding: output MSE; bias correction: mean
    absolute shift; equalization, per pair: the spread of the second layer's input-channel ranges), and the
    count of clipped activation ranges."""
    methods = calibration.get("int8_methods") or {}
    found: dict[str, Any] = {"seconds": methods.get("seconds"), "samples": methods.get("samples"), "layers": []}
    for report in methods.get("methods", []):
        figure = ("output MSE", "mse_before", "mse_after") if report["method"] == "learned-rounding" else \
            ("mean |shift|", "mean_abs_shift_before", "mean_abs_shift_after")
        found["layers"] += [{"method": report["method"], "layer": layer["layer"], "op": layer["op"],
                             "figure": figure[0], "before": layer[figure[1]], "after": layer[figure[2]]}
                            for layer in report.get("layers", [])]
    ranges = calibration.get("ranges")
    if ranges:
        found["ranges"] = {"method": ranges["method"], "clipped": ranges["clipped"], "seconds": ranges["seconds"]}
    equalized = calibration.get("equalize") or {}
    if equalized.get("applied"):  # per pair: how far apart the second layer's input-channel ranges are
        found["equalize"] = {"pairs": equalized["pairs"], "sweeps": equalized["sweeps"],
                             "seconds": equalized.get("seconds")}
        found["layers"] += [{"method": "equalize", "layer": f"{pair['first']} -> {pair['second']}", "op": pair["ops"],
                             "figure": "input-channel range spread", "before": pair["spread_before"],
                             "after": pair["spread_after"]} for pair in equalized.get("layers", [])]
    return found
