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
it is given, with ``pipeline.layer_error``'s reading of tensor names: an op
belongs to the layer of its conv/matmul part.

int16x8 models, and int8 models whose chosen layers should compute in int16
rather than float, are made another way: TF 2.21 quantizes 16-bit
activations with its older quantizer (``Calibrator.calibrate_and_quantize``),
which has no denylist, and the MLIR quantizer's ``QUANTIZED_INT16`` output is
refused by LiteRT's kernels (asymmetric int16 zero points,
tensorflow/tensorflow#75558, and int32 instead of int64 biases; both measured
here on TF 2.21). So the model is converted as usual, the same source is
converted once more as the *donor* (float32, or int16x8), and the layers'
ops are spliced from the donor into the quantized model
(``pipeline.splice``), with DEQUANTIZE/QUANTIZE ops at their boundary.
``method_for`` says which way a setting takes.

The denylist hook is pinned to the TensorFlow version below; on any other
version an int8 conversion with float layers fails with a clear error
(``tests/test_float_fallback.py`` checks the private names exist and behave).
The splice uses only the flatbuffer schema and is not pinned.
"""

from __future__ import annotations

import contextlib

from pipeline.errors import ConversionError

SUPPORTED_TF = ("2.21.",)


def hooks_supported() -> tuple[bool, str]:
    """Whether this TensorFlow has the private quantizer entry points wrapped here."""
    try:
        import tensorflow as tf
        from tensorflow.lite.python import lite
    except ImportError as exc:
        return False, f"cannot import the TFLite converter internals ({exc})"
    if not tf.__version__.startswith(SUPPORTED_TF):
        return False, (f"per-layer float fallback is pinned to TensorFlow {'/'.join(SUPPORTED_TF)}x, "
                       f"found {tf.__version__}")
    if not callable(getattr(lite, "_mlir_quantize", None)):
        return False, "tensorflow.lite.python.lite._mlir_quantize is gone"
    import inspect

    if "denylisted_nodes" not in inspect.signature(lite._mlir_quantize).parameters:  # noqa: SLF001
        return False, "tensorflow.lite.python.lite._mlir_quantize no longer takes denylisted_nodes"
    return True, "ok"


def op_outputs_by_layer(model_bytes: bytes) -> dict[str, list[str]]:
    """Keras layer -> output tensor names of the ops computing it, in graph order."""
    from tensorflow.lite.tools import flatbuffer_utils

    from pipeline.layer_error import _primary, layer_names

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    graph = model.subgraphs[0]
    found: dict[str, list[str]] = {}
    for op in graph.operators or []:
        for index in (op.outputs if op.outputs is not None else []):
            name = graph.tensors[int(index)].name
            name = name.decode() if isinstance(name, bytes) else str(name or "")
            names = layer_names(name)
            if names:
                found.setdefault(_primary(name, names), []).append(name)
    return found


def resolve(model_bytes: bytes, layers) -> list[str]:
    """The calibrated model's op output names for ``layers``; an unknown layer is an error, not a silent no-op."""
    by_layer = op_outputs_by_layer(model_bytes)
    missing = [layer for layer in layers if layer not in by_layer]
    if missing:
        known = ", ".join(sorted(by_layer)[:8])
        raise ConversionError(f"cannot keep {', '.join(missing)} in float: no such layer in the converted graph "
                              f"(layers look like: {known}, ...)")
    return [name for layer in layers for name in by_layer[layer]]


def method_for(settings) -> str:
    """How ``settings.float_layers`` are kept out of the quantized graph (``ConvertSettings``)."""
    return "mlir-denylist" if settings.mode == "int8" and settings.fallback == "float" else "splice"


def donor_settings(settings):
    """The conversion the spliced layers are taken from: float32, or int16x8 for ``fallback="int16"``."""
    from pipeline.export import ConvertSettings

    if settings.fallback == "int16":
        return ConvertSettings("int16x8", float_io=settings.float_io, per_channel=settings.per_channel,
                               trust_model_code=settings.trust_model_code)
    return ConvertSettings("float", trust_model_code=settings.trust_model_code)


def convert_spliced(source, settings, representative=None, progress=None, record: dict | None = None) -> bytes:
    """Convert with ``settings.float_layers`` spliced in from the donor conversion (see ``method_for``)."""
    from dataclasses import replace

    from pipeline.export import convert_bytes
    from pipeline.splice import splice

    record = record if record is not None else {}
    host = convert_bytes(source, replace(settings, float_layers=()), representative, progress, record)
    report: dict = {}
    spliced = splice(host, donor_model(source, settings, representative), settings.float_layers, record=report)
    record.update({"fallback_method": "splice", "float_layers": list(settings.float_layers), "splice": report})
    return spliced


def denylist(calibrated: bytes, layers, record: dict) -> list[str]:
    """The MLIR quantizer's ``denylisted_nodes`` for ``layers`` of this calibrated model, recorded."""
    nodes = resolve(calibrated, layers)
    record.update({"fallback_method": "mlir-denylist", "quantizer": "mlir", "float_layers": list(layers),
                   "denylisted_nodes": nodes})
    return nodes


def donor_model(source, settings, representative=None) -> bytes:
    """The conversion the spliced layers come from (``donor_settings``); the float one is the source's cached one."""
    from pipeline.export import convert_bytes, float_tflite

    spec = donor_settings(settings)
    return float_tflite(source) if spec.mode == "float" else convert_bytes(source, spec, representative)


@contextlib.contextmanager
def keep_float(layers, *, record: dict):
    """Within this block, the converter leaves the ops of ``layers`` (Keras layer names) in float.

    ``record`` receives the quantizer used and the tensor names denylisted.
    """
    ok, why = hooks_supported()
    if not ok:
        raise ConversionError(f"cannot keep layers in float: {why}")
    from tensorflow.lite.python import lite

    layers = list(layers)
    stock_quantize = lite._mlir_quantize  # noqa: SLF001

    def mlir_quantize(calibrated, *args, **kwargs):
        return stock_quantize(calibrated, *args, denylisted_nodes=denylist(calibrated, layers, record), **kwargs)

    lite._mlir_quantize = mlir_quantize  # noqa: SLF001
    try:
        yield record
    finally:
        lite._mlir_quantize = stock_quantize  # noqa: SLF001
