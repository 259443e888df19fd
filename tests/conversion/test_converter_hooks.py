"""The fast calibrator: pinned to this TensorFlow, equal to the stock ranges where it should be,
as accurate on real images, and falling back to the stock path when it cannot run."""

import numpy as np

from pipeline.conversion import converter_hooks
from pipeline.conversion.export import ConvertSettings, export_tflite, float_outputs
from pipeline.model.modelio import load_source
from pipeline.tflite.runtime import run_batch


def test_hooks_are_supported_on_the_pinned_tensorflow():
    ok, why = converter_hooks.calibrator_supported()
    assert ok, f"the private calibrator hook broke ({why}): re-check pipeline/conversion/converter_hooks.py for this TF"


def _stock_calibration(source, calibration):
    """The converter's own calibrated model, and the float model it calibrated."""
    from tensorflow.lite.python.optimize import calibrator

    from pipeline.conversion.routes import _configure, _make_converter

    seen = {}
    original = calibrator.Calibrator.calibrate

    def spy(self, dataset_gen):
        seen["float"] = self._model_content
        return original(self, dataset_gen)

    converter = _make_converter(source)
    _configure(converter, ConvertSettings("int8"), calibration, None, False)
    converter._experimental_calibrate_only = True
    calibrator.Calibrator.calibrate = spy
    try:
        calibrated = converter.convert()
    finally:
        calibrator.Calibrator.calibrate = original
    return seen["float"], calibrated


def _ranges(model_bytes):
    from tensorflow.lite.tools import flatbuffer_utils

    graph = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes)).subgraphs[0]
    out = {}
    for i, t in enumerate(graph.tensors):
        q = t.quantization
        if q is not None and q.min is not None and len(q.min):
            out[i] = (float(q.min[0]), float(q.max[0]))
    return out, graph


# Float rounding: the stock logger runs TensorFlow's builtin kernels and the fast path XNNPACK's, which sum each
# dot product in another order (and pick CPU-specific microkernels), so a min or max moves by a few units in the
# last place (ulp) of the tensor's magnitude: at most 13 on the tiny models here, trained or not. 64 ulp is about
# 7.6e-6 of the magnitude; an int8 range spans zero and the magnitude, so its step is at least magnitude / 255
# and the bound is under 0.2% of one step: rounding, never a different range.
ROUNDING_ULP = 64


def _close(a: float, b: float, magnitude: float) -> bool:
    return abs(a - b) <= ROUNDING_ULP * float(np.spacing(np.float32(magnitude)))


def _overwritten_in_place(graph, opcodes) -> dict[int, int]:
    """{ADD input: the ADD's output} for the inputs TFLite's memory planner lets an ADD overwrite.

    The rule of tensorflow/lite/arena_planner.cc (IdentifyInPlaceTensors, InputTensorCanBeShared): the
    output takes the buffer of the first input that has the output's size, is read once (by this op) and
    is neither a graph input nor a graph output, nor a constant, and only when the output is no graph
    output (nor shares the buffer of a tensor read elsewhere).
    """
    from pipeline.tflite.flatbuffers import op_names

    names = op_names()
    refs: dict[int, int] = {}
    for t in [*graph.inputs, *graph.outputs] + [int(i) for op in graph.operators for i in op.inputs]:
        refs[int(t)] = refs.get(int(t), 0) + 1
    shared: dict[int, int] = {}  # tensor -> the tensor whose buffer it uses
    overwritten: dict[int, int] = {}
    for op in graph.operators:
        code = opcodes[op.opcodeIndex]
        if names[max(code.builtinCode, code.deprecatedBuiltinCode)] != "ADD":
            continue
        out = int(op.outputs[0])
        if out in graph.outputs:
            continue
        for i in (int(i) for i in op.inputs):
            t = graph.tensors[i]
            if (tuple(t.shape) == tuple(graph.tensors[out].shape) and t.type == graph.tensors[out].type
                    and refs[i] == 1 and i not in graph.inputs and not _constant(graph, i)):
                if refs[shared.get(i, i)] == 1:
                    shared[out] = shared.get(i, i)
                    overwritten[i] = out
                break
    return overwritten


def _constant(graph, tensor: int) -> bool:
    return not any(tensor in op.outputs for op in graph.operators) and tensor not in graph.inputs


def test_ranges_equal_stock_up_to_rounding_except_the_inputs_an_add_overwrites(trained_run, calibration):
    """Exactly the README's claim: on every tensor the ranges agree up to float rounding, except the ADD
    inputs TFLite overwrites in place, whose stock range is the union of their own and the sum's."""
    from tensorflow.lite.tools import flatbuffer_utils

    source = load_source(trained_run.model_path)
    float_model, stock = _stock_calibration(source, calibration)
    fast, info, _ = converter_hooks.fast_minmax(float_model, calibration.batches())
    assert info["samples"] == len(calibration)
    stock_ranges, graph = _ranges(stock)
    fast_ranges, _ = _ranges(fast)
    assert set(stock_ranges) == set(fast_ranges)
    opcodes = flatbuffer_utils.read_model_from_bytearray(bytearray(float_model)).operatorCodes
    overwritten = _overwritten_in_place(graph, opcodes)
    assert overwritten, "the tiny Xception has residual ADDs whose input is read by nothing else"
    wider = 0
    for t, (lo, hi) in stock_ranges.items():
        if t in overwritten:  # the union of the tensor's own range and the sum's
            s_lo, s_hi = stock_ranges[overwritten[t]]
            (f_lo, f_hi), magnitude = fast_ranges[t], max(abs(lo), abs(hi))
            assert _close(lo, min(f_lo, s_lo), magnitude) and _close(hi, max(f_hi, s_hi), magnitude), t
            wider += not (_close(lo, f_lo, magnitude) and _close(hi, f_hi, magnitude))
        else:
            f_lo, f_hi = fast_ranges[t]
            magnitude = max(abs(lo), abs(hi), abs(f_lo), abs(f_hi))
            assert _close(lo, f_lo, magnitude) and _close(hi, f_hi, magnitude), (t, (lo, hi), (f_lo, f_hi))
    assert wider, "no overwritten input's stock range was wider than its own: the exception would be moot"


def test_one_interpreter_per_core_up_to_four_and_an_exact_merge(trained_run, calibration, monkeypatch):
    """The README's words: one interpreter per core, at most 4; and the per-worker ranges merge exactly,
    so the calibrated model does not depend on how many ran."""
    import os

    from pipeline.conversion.export import convert_bytes

    float_model = convert_bytes(load_source(trained_run.model_path), ConvertSettings("float"))
    calibrated = {}
    for cores, workers in ((1, 1), (3, 3), (16, 4)):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        calibrated[cores], info, _ = converter_hooks.fast_minmax(float_model, calibration.batches())
        assert info["workers"] == workers and info["samples"] == len(calibration)
    assert calibrated[1] == calibrated[3] == calibrated[16]


def test_fast_calibration_is_as_accurate_on_real_images(trained_run, calibration, digits, tmp_path):
    from pipeline.core.data import discover
    from pipeline.core.preprocessing import preprocess_file

    items = discover(digits["val"]).items[::3]
    x = np.stack([preprocess_file(i.path, calibration.spec) for i in items])
    labels = np.asarray([trained_run.classes.index(i.label) for i in items])
    source = load_source(trained_run.model_path)
    reference = float_outputs(source, x)
    results = {}
    for method in ("stock", "fast"):
        # [-1, 1] input: the inputs x and the Keras reference are the training scale's
        settings = ConvertSettings("int8", calibrator=method, optimize=False, input_convention="signed_unit")
        r = export_tflite(trained_run.model_path, settings, out=tmp_path / f"{method}.tflite",
                          representative=calibration, source=source)
        out, _ = run_batch(r.model_bytes, x)
        results[method] = {"mae": float(np.abs(out - reference).mean()),
                           "top1": float(np.mean(out.argmax(1) == labels)),
                           "agree": float(np.mean(out.argmax(1) == reference.argmax(1))),
                           "record": r.manifest["calibration"]["method"]}
    assert results["fast"]["record"]["calibrator"] == "fast-minmax"
    assert results["stock"]["record"]["calibrator"] == "stock"
    assert results["fast"]["mae"] <= results["stock"]["mae"] * 1.10
    assert results["fast"]["top1"] >= results["stock"]["top1"] - 0.01
    assert results["fast"]["agree"] >= 0.97


def test_unsupported_tensorflow_falls_back_to_stock(monkeypatch, tiny_keras_path, calibration, tmp_path):
    monkeypatch.setattr(converter_hooks, "SUPPORTED_TF", ("1.99.",))
    r = export_tflite(tiny_keras_path, ConvertSettings("int8"), out=tmp_path / "m.tflite", representative=calibration)
    method = r.manifest["calibration"]["method"]
    assert method["calibrator"] == "stock" and "pinned to TensorFlow 1.99." in method["fallback"]
    assert r.manifest["ops"]["left_float"] == []
    # the pixel input's range is pinned between the staged conversion's stages: without them, [-1, 1] input
    assert r.manifest["input_convention"]["name"] == "signed_unit" and "staged" in r.manifest["input_convention"]["why"]


def test_fast_path_failure_falls_back(monkeypatch, tiny_keras_path, calibration, tmp_path):
    """Fault injection: if the fast path raises mid-conversion, the stock calibrator runs on the same data."""

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(converter_hooks, "fast_minmax", broken)
    r = export_tflite(tiny_keras_path, ConvertSettings("int8", optimize=False), out=tmp_path / "m.tflite",
                      representative=calibration)
    method = r.manifest["calibration"]["method"]
    assert method["calibrator"] == "stock" and "injected fault" in method["fallback"]
    assert r.manifest["ops"]["left_float"] == [] and r.manifest["io"]["inputs"][0]["dtype"] == "uint8"


def test_per_tensor_switch_only_on_the_pinned_tensorflow(monkeypatch):
    """The converter's per-tensor switch is private: set on the pinned TensorFlow when present, refused otherwise."""
    import pytest

    from pipeline.core.errors import ConversionError

    class Converter:
        _experimental_disable_per_channel = False

    converter = Converter()
    converter_hooks.disable_per_channel(converter)
    assert converter._experimental_disable_per_channel is True
    with pytest.raises(ConversionError, match="_experimental_disable_per_channel is gone"):
        converter_hooks.disable_per_channel(object())
    monkeypatch.setattr(converter_hooks, "SUPPORTED_TF", ("1.99.",))
    with pytest.raises(ConversionError, match="pinned to TensorFlow 1.99.x"):
        converter_hooks.disable_per_channel(Converter())


def test_the_extensions_positional_arguments_are_named_as_the_pinned_tensorflow_names_them():
    """ExperimentalMlirQuantizeModel takes 13 arguments by position: a reorder in TensorFlow would shift them
    silently, so their names are kept equal to the pinned TensorFlow's own wrapper's, in order."""
    import inspect

    from tensorflow.lite.python import convert

    assert converter_hooks.MLIR_QUANTIZE_ARGS == tuple(inspect.signature(convert.mlir_quantize).parameters)
    assert converter_hooks.quantizer_route() == converter_hooks.QuantizerRoute.TENSORFLOW  # loaded in this process
