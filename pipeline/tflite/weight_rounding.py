"""Learned weight rounding: per layer, round each int8 weight up or down to minimize the layer's output error.

Why: rounding every weight to its nearest level is optimal weight by weight,
not for the layer's output, where the errors of the weights that meet the same
input add up (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization"). With the layer's inputs x on the calibration
images, the output error of output channel c is

    sum over x of ((w_int - w / s) . x)^2 * s^2 = e^T H e * s^2,   H = sum of x x^T

(e: the rounding error in quanta, one entry per weight the channel reads;
H: the inputs' second moments over every output position, one matrix for a
conv or FC layer, one per channel for a depthwise layer). AdaRound relaxes
this binary problem with a continuous regularizer and gradient descent;
here it is solved by greedy coordinate descent from rounding to nearest:
each weight is moved to its other neighbour (floor <-> ceil of w / s) when
that lowers the quadratic, the gradient H e is updated in place, and sweeps
repeat until none moves. Every step lowers the error, so the result is never
worse than rounding to nearest on these inputs (checked again at the end per
channel, to be immune to float drift), and every weight stays floor or ceil
of w / s: within one quantum of the float weight.

The inputs are the float model's (as in AdaRound), so all layers are done
from one float run; the int8 scales, zero points and graph are unchanged,
and only the int8 weight buffers are written.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.tflite.weighted_layers import (
    Constants,
    WeightedLayer,
    rows,
    run_exposing,
    taps,
    weighted_layers,
    workers_for,
)

MAX_SWEEPS = 4
_LIMIT = 127  # TFLite's int8 weights are symmetric: [-127, 127]


@dataclass
class LayerRounding:
    """What learned rounding did to one layer: its output error on the calibration inputs, before and after."""

    layer: str
    op: str
    weights: int
    changed: int  # weights now rounded the other way
    mse_before: float  # mean squared output error per output value, in output units
    mse_after: float
    sweeps: int

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class RoundingReport:
    samples: int = 0
    seconds: float = 0.0
    layers: list[LayerRounding] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": "learned-rounding", "samples": self.samples, "seconds": round(self.seconds, 3),
                "layers": [entry.to_dict() for entry in self.layers], "skipped": self.skipped}


def _patch_matrix(x: np.ndarray, layer: WeightedLayer) -> np.ndarray:
    """Positions x (taps * channels) for a conv, in the weights' (kh, kw, cin) order; rows for an FC layer."""
    if layer.op == "FULLY_CONNECTED":
        return rows(x, layer).astype(np.float64)
    image = x.reshape(x.shape[-3:])
    windows = [window for _, _, window in taps(image, layer)]
    stacked = np.stack(windows, axis=2)  # OH x OW x taps x C
    return stacked.reshape(-1, stacked.shape[2] * stacked.shape[3]).astype(np.float64)


def _depthwise_taps(x: np.ndarray, layer: WeightedLayer) -> np.ndarray:
    """Output channels x taps x positions for a depthwise layer (input channel c // multiplier per output c).

    Channels first, each tap's positions contiguous: the per-channel products
    ``t @ t^T`` then run as BLAS calls on the layout as it is (2.4x faster than
    transposing a positions-first stack, measured on an 80x80x96 input).
    """
    image = x.reshape(x.shape[-3:])
    windows = [window for _, _, window in taps(image, layer)]
    positions = int(np.prod(windows[0].shape[:2]))
    stacked = np.empty((x.shape[-1], len(windows), positions))
    for k, window in enumerate(windows):
        stacked[:, k, :] = window.reshape(positions, -1).T
    return np.repeat(stacked, layer.multiplier, axis=0) if layer.multiplier > 1 else stacked


def _moment(x: np.ndarray, layer: WeightedLayer) -> tuple[np.ndarray, int]:
    """One image's H for ``layer`` from its input ``x``, and the number of output positions it sums over."""
    if layer.op == "DEPTHWISE_CONV_2D":
        t = _depthwise_taps(x, layer)  # C x taps x positions
        return np.matmul(t, t.transpose(0, 2, 1)), t.shape[2]
    p = _patch_matrix(x, layer)
    return p.T @ p, p.shape[0]


def second_moments(float_model: bytes, layers: list[WeightedLayer], inputs,
                   added: Callable[[int], None] | None = None) -> tuple[dict[int, np.ndarray], dict]:
    """Per layer, H (K x K; channels x K x K for depthwise) of its float inputs over ``inputs``, and the number of
    output positions each H sums over.

    Each image's layers are shared among one thread per core (the products
    release the GIL; one BLAS thread each); each H is added up in image order
    in this thread, so the sums do not depend on the threads' timing.
    """
    moments: dict[int, np.ndarray] = {}
    positions: dict[int, int] = {}
    images = [0]
    with ThreadPoolExecutor(max_workers=workers_for(len(layers))) as pool:

        def visit(values):
            found = pool.map(lambda layer: _moment(values[layer.float_input], layer), layers)
            for layer, (h, n) in zip(layers, found):
                if layer.quant_op in moments:
                    moments[layer.quant_op] += h
                else:
                    moments[layer.quant_op] = h
                positions[layer.quant_op] = positions.get(layer.quant_op, 0) + n
            images[0] += 1
            if added is not None:
                added(images[0])

        run_exposing(float_model, sorted({layer.float_input for layer in layers}), inputs, visit)
    return moments, positions


def channel_errors(errors: np.ndarray, h: np.ndarray, depthwise: bool) -> np.ndarray:
    """e^T H e per output channel (errors: channels x K in quanta)."""
    if depthwise:
        return np.sum(np.matmul(h, errors[:, :, None])[:, :, 0] * errors, axis=1)
    return np.sum((errors @ h) * errors, axis=1)


def _descend(rounded: np.ndarray, exact: np.ndarray, h: np.ndarray, depthwise: bool) -> tuple[np.ndarray, int]:
    """Greedy coordinate descent on e^T H e over floor/ceil choices, all channels at once; (weights, sweeps)."""
    rounded = rounded.astype(np.float64).copy()
    low, high = np.floor(exact), np.ceil(exact)
    errors = rounded - exact
    gradient = np.matmul(h, errors[:, :, None])[:, :, 0] if depthwise else errors @ h
    diagonal = np.einsum("caa->ca", h) if depthwise else np.broadcast_to(np.diag(h), errors.shape)
    sweeps = 0
    for sweeps in range(1, MAX_SWEEPS + 1):
        moved = 0
        for k in range(exact.shape[1]):
            other = np.where(rounded[:, k] == low[:, k], high[:, k], low[:, k])
            step = other - rounded[:, k]
            gain = 2.0 * step * gradient[:, k] + step * step * diagonal[:, k]
            take = (step != 0) & (gain < 0) & (np.abs(other) <= _LIMIT)
            if not take.any():
                continue
            moved += int(take.sum())
            rounded[take, k] = other[take]
            delta = step[take][:, None]
            gradient[take] += delta * (h[take, k, :] if depthwise else h[k][None, :])
        if not moved:
            break
    return rounded, sweeps


def learn_rounding(quant_model: bytes, float_model: bytes, inputs,
                   progress: Callable[[int, int], None] | None = None) -> tuple[bytes, RoundingReport]:
    """``quant_model`` with the int8 weights of every matched layer re-rounded on ``inputs`` (float model inputs);
    ``progress(done, total)`` hears each image whose second moments are added, then each layer rounded."""
    t0 = time.perf_counter()
    inputs = [np.asarray(x, dtype=np.float32) for x in inputs]
    report = RoundingReport(samples=len(inputs))
    layers = weighted_layers(quant_model, float_model)
    if not layers or not inputs:
        return quant_model, report
    constants, floating = Constants(quant_model), Constants(float_model)
    # Many small products: BLAS threads cost more than they give here (measured 2-10x slower on 2 busy cores).
    with threadpool_limits(1):
        total = len(inputs) + len(layers)
        added = None if progress is None else (lambda done: progress(done, total))
        moments, positions = second_moments(float_model, layers, inputs, added)
        for k, layer in enumerate(layers, 1):
            entry = _round_layer(constants, floating, layer, moments[layer.quant_op], positions[layer.quant_op])
            if isinstance(entry, dict):
                report.skipped.append(entry)
            else:
                report.layers.append(entry)
            if progress is not None:
                progress(len(inputs) + k, total)
    report.seconds = time.perf_counter() - t0
    return constants.bytes(), report


def layer_problem(constants: Constants, floating: Constants, layer: WeightedLayer):
    """(int8 weights, float weights / scale, scales), each as output channels x weights per channel."""
    quantized = constants.view(layer.quant_weights)
    scales, _, axis = constants.quantization(layer.quant_weights)
    weights = floating.view(layer.float_weights).astype(np.float64)
    if layer.op == "DEPTHWISE_CONV_2D":  # 1 x KH x KW x C: channels last
        as_rows = lambda a: np.moveaxis(a.reshape(-1, a.shape[-1]), 1, 0)  # noqa: E731
    else:
        as_rows = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
    per_channel = np.broadcast_to(scales, (as_rows(quantized).shape[0],)).astype(np.float64)
    return as_rows(quantized), as_rows(weights) / per_channel[:, None], per_channel


def _round_layer(constants: Constants, floating: Constants, layer: WeightedLayer, h: np.ndarray,
                 positions: int) -> LayerRounding | dict:
    """Re-round one layer in place; its report entry, or why it was left as it was."""
    quantized, exact, scales = layer_problem(constants, floating, layer)
    depthwise = layer.op == "DEPTHWISE_CONV_2D"
    nearest = quantized.astype(np.float64)
    if not np.all((nearest == np.floor(exact)) | (nearest == np.ceil(exact))):
        return {"layer": layer.name, "why": "the int8 weights are not the float weights rounded (another source?)"}
    learned, sweeps = _descend(nearest, exact, h, depthwise)
    before = channel_errors(nearest - exact, h, depthwise)
    after = channel_errors(learned - exact, h, depthwise)
    worse = after > before
    learned[worse] = nearest[worse]  # float drift in the running gradient must never cost a channel
    after = np.where(worse, before, after)
    outputs = positions * len(scales)
    view = constants.view(layer.quant_weights)
    new = learned.astype(np.int8)
    if depthwise:
        view[...] = np.moveaxis(new, 0, 1).reshape(view.shape)
    else:
        view[...] = new.reshape(view.shape)
    return LayerRounding(layer.name, layer.op, int(nearest.size), int(np.count_nonzero(learned != nearest)),
                         float(np.sum(before * scales ** 2) / outputs), float(np.sum(after * scales ** 2) / outputs),
                         sweeps)
