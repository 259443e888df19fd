"""Empirical bias correction: fold the mean output shift that quantization introduces into each int32 bias.

Why: rounding weights and activations to 8 bits shifts a layer's mean output
(Nagel et al. 2019, "Data-free quantization through weight equalization and
bias correction"; Banner et al. 2019), and the shift is passed on and grows
through the network. Per output channel c, the shift on the calibration
images is

    mean(int8 layer output before activation) - mean(float layer output before activation)

where the int8 side sees the int8 model's own inputs (so upstream error is
corrected too) and the float side the float model's. Both means are exact
sums of tap means (``weighted_layers.output_means``: a convolution is linear),
so no convolution is run in numpy. The shift is subtracted from the int32
bias in units of its quantum (input scale x weight scale of that channel);
afterwards the mean shift is at most half a bias quantum per channel on the
same images.

Layers are corrected in dependency order (``weighted_layers.levels``), each
group measured on the model with every earlier group already corrected, so
that bound holds for every layer of the final model. The int8 model runs
piecewise (``pieces.PiecewiseRun``): each group's inputs are computed by the
ops between it and the earlier groups only, so the int8 model's ops run once
per image in all, as the float model's do; and since a tap mean is linear in
the input, each layer's input is summed over the images and its tap means
taken once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.tflite.pieces import PiecewiseRun
from pipeline.tflite.weighted_layers import (
    Constants,
    InputSums,
    WeightedLayer,
    levels,
    output_means,
    sum_exposing,
    tap_means,
    unshared,
    weighted_layers,
)

_INT32 = np.iinfo(np.int32)


@dataclass
class LayerShift:
    """What bias correction did to one layer: the mean output shift before and after, in output units."""

    layer: str
    op: str
    channels: int
    mean_abs_shift_before: float
    mean_abs_shift_after: float
    max_abs_shift_before: float
    max_abs_shift_after: float
    max_bias_quantum: float
    changed: int  # channels whose bias moved

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class BiasCorrectionReport:
    samples: int = 0
    passes: int = 0  # groups of layers corrected in turn
    pieces: int = 0  # pieces of the int8 model run (each op once in all)
    float_means: str = ""  # where the float means came from: the calibration's pass, or a float run of its own
    seconds: float = 0.0
    layers: list[LayerShift] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": "bias-correction", "samples": self.samples, "passes": self.passes,
                "pieces": self.pieces, "float_means": self.float_means,
                "seconds": round(self.seconds, 3), "layers": [entry.to_dict() for entry in self.layers],
                "skipped": self.skipped}


def float_output_means(float_model: bytes, layers: list[WeightedLayer], inputs,
                       float_sums: InputSums | None = None) -> dict[int, np.ndarray]:
    """Each layer's mean float output (before activation) per channel over ``inputs``, keyed by its int8 op;
    from ``float_sums`` (the same inputs' sums, taken by the calibration) where it covers every layer."""
    constants = Constants(float_model)
    # a tap mean is linear in the input: sum the inputs, take the taps once
    needed = sorted({layer.float_input for layer in layers})
    if float_sums is not None and float_sums.covers(needed, len(inputs)):
        sums, count = float_sums.sums, float_sums.count
    else:
        sums, count = sum_exposing(float_model, needed, inputs)
    found = {}
    for layer in layers:
        bias = constants.view(layer.float_bias).astype(np.float64) if layer.float_bias is not None else 0.0
        means = tap_means(sums[layer.float_input] / count, layer)
        found[layer.quant_op] = output_means(constants.view(layer.float_weights), means, layer) + bias
    return found


def accumulator_means(constants: Constants, layers: list[WeightedLayer], sums: dict[int, np.ndarray],
                      count: int) -> dict[int, np.ndarray]:
    """Each int8 layer's mean accumulator without its bias (integer units, exact in float64), from the sum of
    its input over ``count`` images (``sums``: input tensor -> int64 sum, the tensor's shape)."""
    found = {}
    for layer in layers:
        zero = int(constants.quantization(layer.quant_input)[1][0])
        means = tap_means(sums[layer.quant_input] / count - zero, layer)
        found[layer.quant_op] = output_means(constants.view(layer.quant_weights), means, layer)
    return found


def _bias(layer: WeightedLayer) -> int:
    """The layer's int32 bias tensor; only layers that have one are corrected."""
    if layer.quant_bias is None:
        raise ValueError(f"layer {layer.name} has no bias tensor")
    return layer.quant_bias


def bias_quanta(constants: Constants, layer: WeightedLayer) -> np.ndarray:
    """Per output channel, the real value of one unit of the int32 bias (input scale x weight scale)."""
    input_scale = constants.quantization(layer.quant_input)[0][0]
    weight_scales = constants.quantization(layer.quant_weights)[0]
    channels = constants.shape(_bias(layer))[0]
    return input_scale * np.broadcast_to(weight_scales, (channels,)).astype(np.float64)


def correct_biases(quant_model: bytes, float_model: bytes, inputs, float_sums: InputSums | None = None,
                   progress: Callable[[int, int], None] | None = None) -> tuple[bytes, BiasCorrectionReport]:
    """``quant_model`` with every matched layer's int32 bias corrected on ``inputs`` (float model inputs, HxWx3).

    ``float_sums``: the float layers' inputs summed over the same ``inputs`` (the fast calibrator's), which
    spares the float model's run; without them, or when they do not cover every layer, the float model runs.
    ``progress(done, total)`` hears each group of layers corrected.
    """
    with threadpool_limits(1):  # small products: one BLAS thread is faster beside the interpreter's own
        return _correct_biases(quant_model, float_model, inputs, float_sums, progress)


def _correct_biases(quant_model: bytes, float_model: bytes, inputs, float_sums: InputSums | None,
                    progress: Callable[[int, int], None] | None) -> tuple[bytes, BiasCorrectionReport]:
    t0 = time.perf_counter()
    inputs = [np.asarray(x, dtype=np.float32) for x in inputs]
    report = BiasCorrectionReport(samples=len(inputs))
    layers = weighted_layers(quant_model, float_model)
    report.skipped = [{"layer": layer.name, "why": "no bias tensor"} for layer in layers if layer.quant_bias is None]
    layers = [layer for layer in layers if layer.quant_bias is not None]
    if not layers or not inputs:
        return quant_model, report
    targets = float_output_means(float_model, layers, inputs, float_sums)
    report.float_means = "calibration pass" if float_sums is not None and float_sums.covers(
        [layer.float_input for layer in layers], len(inputs)) else "own float run"
    current = unshared(quant_model, [_bias(layer) for layer in layers])
    constants = Constants(current)
    groups = levels(current, layers)
    with PiecewiseRun(current, inputs) as run:  # each group's inputs computed once, after every earlier correction
        for group in groups:
            sums = run.sums([layer.quant_input for layer in group])
            accumulators = accumulator_means(constants, group, sums, run.count)
            for layer in group:
                report.layers.append(_correct(constants, layer, accumulators[layer.quant_op],
                                              targets[layer.quant_op]))
                run.patch(_bias(layer), constants.view(_bias(layer)))
            report.passes += 1
            if progress is not None:
                progress(report.passes, len(groups))
        report.pieces = run.pieces
    report.seconds = time.perf_counter() - t0
    return constants.bytes(), report


def _correct(constants: Constants, layer: WeightedLayer, accumulator: np.ndarray, target: np.ndarray) -> LayerShift:
    """Move the layer's int32 bias by the rounded mean shift, in place; what changed, in output units."""
    bias = constants.view(_bias(layer))
    quantum = bias_quanta(constants, layer)
    before = quantum * (accumulator + bias.astype(np.float64)) - target
    step = np.round(before / quantum).astype(np.int64)
    new = np.clip(bias.astype(np.int64) - step, _INT32.min, _INT32.max)
    after = quantum * (accumulator + new.astype(np.float64)) - target
    changed = int(np.count_nonzero(new != bias))
    bias[...] = new.astype(np.int32)
    return LayerShift(layer.name, layer.op, int(len(bias)), float(np.mean(np.abs(before))),
                      float(np.mean(np.abs(after))), float(np.max(np.abs(before))), float(np.max(np.abs(after))),
                      float(np.max(quantum)), changed)
