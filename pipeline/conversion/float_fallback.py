"""The one place that keeps chosen layers out of the quantized graph: in float, or in int16.

int8 to float goes through TFLiteConverter's own quantizer. Why private API:
TFLite's only way to leave a node unquantized is
``mlir_quantize(..., denylisted_nodes=...)``, which the public converter never
exposes; ``tf.lite.experimental.QuantizationDebugger`` reaches it the same way
(``convert.mlir_quantize`` on the calibrated model). Here the converter's own
call (``lite._mlir_quantize``, made after calibration) is wrapped, so every
other converter step (int8 I/O, buffer deduplication) stays the stock one.

Names: the caller gives Keras layer names (``block7_sepconv2``), which are
stable across conversions and what a manifest should record. The MLIR
quantizer matches ``denylisted_nodes`` against op output tensor names of the
*calibrated* model, which are fused and suffixed
(``xception_1/block7_sepconv2_bn_1/batchnorm/add_1;xception_1/block7_sepconv2_1/separable_conv2d;...sub1``;
measured on TF 2.21: the names of the float model, or a single fused part,
match nothing). So the names are resolved inside the wrapper, on the model
it is given, with ``pipeline.tflite.layers``' reading of tensor names (the one
per-layer error uses too): an op belongs to the layer of its conv/matmul part.

int16x8 models, and int8 models whose chosen layers should compute in int16
rather than float, are made another way: TF 2.21 quantizes 16-bit
activations with its older quantizer (``Calibrator.calibrate_and_quantize``),
which has no denylist, and the MLIR quantizer's ``QUANTIZED_INT16`` output is
refused by LiteRT's kernels (asymmetric int16 zero points,
tensorflow/tensorflow#75558, and int32 instead of int64 biases; both measured
here on TF 2.21). So the model is converted as usual, the same source is
converted once more as the *donor* (float32, or int16x8), and the layers'
ops are spliced from the donor into the quantized model
(``pipeline.tflite.splice``), with DEQUANTIZE/QUANTIZE ops at their boundary.
``method_for`` says which way a setting takes.

The denylist hook is pinned to the TensorFlow version below; on any other
version an int8 conversion with float layers fails with a clear error
(``tests/conversion/test_float_fallback.py`` checks the private names exist and behave).
The splice uses only the flatbuffer schema and is not pinned.
"""

from __future__ import annotations

from pipeline.conversion.settings import ConvertSettings
from pipeline.core.errors import ConversionError
from pipeline.tflite import flatbuffers
from pipeline.tflite.layers import layer_names, primary_layer


def _output_names(model_bytes: bytes):
    """Each op output's tensor name with the Keras layers it names, in graph order."""
    graph = flatbuffers.read(model_bytes).subgraphs[0]
    for op in graph.operators or []:
        for index in (op.outputs if op.outputs is not None else []):
            name = graph.tensors[int(index)].name
            name = name.decode() if isinstance(name, bytes) else str(name or "")
            yield name, layer_names(name)


def op_outputs_by_layer(model_bytes: bytes) -> dict[str, list[str]]:
    """Keras layer -> output tensor names of the ops computing it, in graph order."""
    found: dict[str, list[str]] = {}
    for name, names in _output_names(model_bytes):
        if names:
            found.setdefault(primary_layer(name, names), []).append(name)
    return found


def folded_into(model_bytes: bytes) -> dict[str, list[str]]:
    """Keras layer -> output tensor names of the ops it was fused into without being their primary layer (a
    BatchNormalization folded into a convolution, ``pipeline.tflite.scale_fold``), in graph order."""
    found: dict[str, list[str]] = {}
    for name, names in _output_names(model_bytes):
        for layer in names:
            if layer != primary_layer(name, names):
                found.setdefault(layer, []).append(name)
    return found


def resolve(model_bytes: bytes, layers) -> list[str]:
    """The calibrated model's op output names for ``layers``; an unknown layer is an error, not a silent no-op.

    A layer no op computes alone (fused into another) resolves to the ops it was fused into."""
    by_layer = op_outputs_by_layer(model_bytes)
    if any(layer not in by_layer for layer in layers):
        fused = folded_into(model_bytes)
        by_layer.update({layer: fused[layer] for layer in layers if layer not in by_layer and layer in fused})
    missing = [layer for layer in layers if layer not in by_layer]
    if missing:
        known = ", ".join(sorted(by_layer)[:8])
        raise ConversionError(f"cannot keep {', '.join(missing)} in float: no such layer in the converted graph "
                              f"(layers look like: {known}, ...)")
    return list(dict.fromkeys(name for layer in layers for name in by_layer[layer]))


def method_for(settings) -> str:
    """How ``settings.float_layers`` are kept out of the quantized graph (``ConvertSettings``)."""
    return "mlir-denylist" if settings.mode == "int8" and settings.fallback == "float" else "splice"


def donor_settings(settings):
    """The conversion the spliced layers are taken from: float32, or int16x8 for ``fallback="int16"``."""
    if settings.fallback == "int16":
        return ConvertSettings("int16x8", float_io=settings.float_io, per_channel=settings.per_channel,
                               trust_model_code=settings.trust_model_code)
    return ConvertSettings("float", trust_model_code=settings.trust_model_code)


def denylist(calibrated: bytes, layers, record: dict) -> list[str]:
    """The MLIR quantizer's ``denylisted_nodes`` for ``layers`` of this calibrated model, recorded."""
    nodes = resolve(calibrated, layers)
    record.update({"fallback_method": "mlir-denylist", "quantizer": "mlir", "float_layers": list(layers),
                   "denylisted_nodes": nodes})
    return nodes
