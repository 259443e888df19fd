"""Where quantization error comes from: per-layer error of an integer model against its float twin.

The idea of TFLite's QuantizationDebugger (RMSE over the quantization scale
per layer), done without it: the upstream debugger has broken between
releases (tensorflow/tensorflow#86949). Here the float .tflite and the
integer .tflite of one source run side by side, each quantized op output
compared with the float tensor of the same name (the converter names both
alike, e.g. ``xception_1/block7_sepconv2_bn_1/batchnorm/add_1;...``).

The compared tensors are made graph outputs of copies of both models, which
then run under XNNPACK with normal memory planning. Keeping every tensor
instead (``experimental_preserve_all_tensors``, reference kernels) kept the
scratch buffers too and took 24 GB on Xception-299 until the OOM killer
stepped in; the outputs copy takes the activations of one image.

The error is accumulated, not isolated: each layer sees the integer model's
own (already perturbed) inputs. An RMSE/scale near 0.29 is pure rounding
(a uniform error of one step has standard deviation 1/sqrt(12)); the layer
where the figure jumps is the one to keep in float. ``layer_errors`` is the
reusable entry point (float fallback ranking uses it too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from pipeline.core.preprocessing import dequantize, quantize
from pipeline.tflite.layers import expose_tensors, layer_names, primary_layer
from pipeline.tflite.runtime import graph_ops, open_interpreter


@dataclass
class LayerError:
    layer: str  # the layer that computes this tensor (its conv/matmul when several layers were fused)
    fused: list[str]  # every layer folded into this op, in the converter's order
    op: str
    tensor: str
    scale: float
    samples: int = 0
    _sq: float = field(default=0.0, repr=False)
    _abs: float = field(default=0.0, repr=False)
    _max: float = field(default=0.0, repr=False)
    _count: int = field(default=0, repr=False)
    _range: float = field(default=0.0, repr=False)

    def add(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        diff = quantized.astype(np.float64) - reference.astype(np.float64)
        self._sq += float(np.sum(diff * diff))
        self._abs += float(np.sum(np.abs(diff)))
        self._max = max(self._max, float(np.max(np.abs(diff))) if diff.size else 0.0)
        self._count += diff.size
        self._range = max(self._range, float(np.max(np.abs(reference))) if reference.size else 0.0)
        self.samples += 1

    @property
    def rmse(self) -> float:
        return (self._sq / self._count) ** 0.5 if self._count else 0.0

    @property
    def rmse_over_scale(self) -> float:
        return self.rmse / self.scale if self.scale else float("inf")

    def to_dict(self) -> dict:
        return {"layer": self.layer, "fused": self.fused, "op": self.op, "tensor": self.tensor,
                "scale": self.scale, "rmse": self.rmse, "rmse_over_scale": self.rmse_over_scale,
                "mean_abs_error": self._abs / self._count if self._count else 0.0, "max_abs_error": self._max,
                "float_abs_max": self._range, "samples": self.samples}


def _quantized_outputs(interpreter, model_bytes: bytes) -> list[tuple[int, str, str, float, int]]:
    """(index, name, op, scale, zero point) of every integer op output that has a quantization scale."""
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    found = []
    for op in graph_ops(interpreter, model_bytes):
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        for index in op["outputs"]:
            d = details.get(int(index))
            if d is None or np.dtype(d["dtype"]).kind not in "iu":
                continue
            scale_, zero = d["quantization"]
            if scale_ and d["name"]:
                found.append((int(index), d["name"], op["op_name"], float(scale_), int(zero)))
    return found


def layer_errors(float_model: bytes, quant_model: bytes, inputs: Iterable[np.ndarray]) -> list[LayerError]:
    """Per-layer error of ``quant_model`` against ``float_model`` over float ``inputs`` (HxWx3, preprocessed).

    Returns the matched layers sorted worst first (RMSE over scale). Raises
    ``ValueError`` when the two models share no tensor names, i.e. when they
    were not converted from the same source.
    """

    ref_plain = open_interpreter(float_model)
    quant_plain = open_interpreter(quant_model)
    ref_by_name = {d["name"]: d for d in ref_plain.get_tensor_details() if d["name"]}
    pairs = []
    for index, name, op, scale_, zero in _quantized_outputs(quant_plain, quant_model):
        match = ref_by_name.get(name)
        if match is None or np.dtype(match["dtype"]).kind != "f":
            continue
        names = layer_names(name)
        pairs.append((index, match["index"], zero,
                      LayerError(primary_layer(name, names), names, op, name, scale_)))
    if not pairs:
        raise ValueError("no quantized tensor of the integer model has a float tensor of the same name in the "
                         "reference (not converted from the same source, or the reference is not float)")
    del ref_plain, quant_plain
    threads = max(1, os.cpu_count() or 1)
    ref = open_interpreter(expose_tensors(float_model, [p[1] for p in pairs]), threads=threads)
    quant = open_interpreter(expose_tensors(quant_model, [p[0] for p in pairs]), threads=threads)
    ref_in, q_in = ref.get_input_details()[0], quant.get_input_details()[0]
    for x in inputs:
        x = np.asarray(x, dtype=np.float32)[None]
        ref.set_tensor(ref_in["index"], quantize(x, ref_in["dtype"], *ref_in["quantization"]))
        quant.set_tensor(q_in["index"], quantize(x, q_in["dtype"], *q_in["quantization"]))
        ref.invoke()
        quant.invoke()
        for q_index, r_index, zero, entry in pairs:
            entry.add(ref.get_tensor(r_index), dequantize(quant.get_tensor(q_index), entry.scale, zero))
    return sorted((p[3] for p in pairs), key=lambda e: -e.rmse_over_scale)
