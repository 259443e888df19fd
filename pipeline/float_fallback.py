"""The one place that keeps chosen layers in float inside TFLiteConverter's quantizer.

Why private API: TFLite's only way to leave a node unquantized is
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

int16x8 has no float fallback: TF 2.21 quantizes 16-bit activations with its
older quantizer (``Calibrator.calibrate_and_quantize``), which has no
denylist, and the MLIR quantizer's ``QUANTIZED_INT16`` output is refused by
LiteRT's kernels (asymmetric int16 zero points, tensorflow/tensorflow#75558,
and int32 instead of int64 biases; both measured here on TF 2.21).

Pinned to the TensorFlow version below; on any other version a conversion
with float layers fails with a clear error (``tests/test_float_fallback.py``
checks the private names exist and behave).
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


INT16_UNSUPPORTED = ("keeping layers in float is not available for --int16x8 with TensorFlow 2.21: its int16 "
                     "quantizer has no per-layer denylist, and the MLIR quantizer's int16 models do not load in "
                     "LiteRT (tensorflow/tensorflow#75558)")


@contextlib.contextmanager
def keep_float(layers, *, int16: bool, record: dict):
    """Within this block, the converter leaves the ops of ``layers`` (Keras layer names) in float.

    ``record`` receives the quantizer used and the tensor names denylisted.
    """
    if int16:
        raise ConversionError(INT16_UNSUPPORTED)
    ok, why = hooks_supported()
    if not ok:
        raise ConversionError(f"cannot keep layers in float: {why}")
    from tensorflow.lite.python import lite

    layers = list(layers)
    stock_quantize = lite._mlir_quantize  # noqa: SLF001

    def mlir_quantize(calibrated, *args, **kwargs):
        nodes = resolve(calibrated, layers)
        record.update({"quantizer": "mlir", "float_layers": layers, "denylisted_nodes": nodes})
        return stock_quantize(calibrated, *args, denylisted_nodes=nodes, **kwargs)

    lite._mlir_quantize = mlir_quantize  # noqa: SLF001
    try:
        yield record
    finally:
        lite._mlir_quantize = stock_quantize  # noqa: SLF001
