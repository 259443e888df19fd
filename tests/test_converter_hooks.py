"""The fast calibrator: pinned to this TensorFlow, equal to the stock ranges where it should be,
as accurate on real images, and falling back to the stock path when it cannot run."""

import numpy as np

from pipeline import converter_hooks
from pipeline.export import ConvertSettings, export_tflite, float_outputs
from pipeline.modelio import load_source
from pipeline.tflite_optimize import _outputs


def test_hooks_are_supported_on_the_pinned_tensorflow():
    ok, why = converter_hooks.hooks_supported()
    assert ok, f"the private calibrator hook broke ({why}): re-check pipeline/converter_hooks.py for this TF"


def _stock_calibration(source, calibration):
    """The converter's own calibrated model, and the float model it calibrated."""
    from tensorflow.lite.python.optimize import calibrator

    from pipeline.export import _configure, _make_converter

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


def test_ranges_equal_stock_except_tensors_an_add_overwrites(trained_run, calibration):
    source = load_source(trained_run.model_path)
    float_model, stock = _stock_calibration(source, calibration)
    fast, info = converter_hooks.fast_minmax(float_model, calibration.batches())
    assert info["samples"] == len(calibration)
    stock_ranges, graph = _ranges(stock)
    fast_ranges, _ = _ranges(fast)
    assert set(stock_ranges) == set(fast_ranges)
    add_inputs = set()
    for op in graph.operators:
        if len(op.inputs) == 2 and len(op.outputs) == 1:
            add_inputs.update(int(i) for i in op.inputs)
    differ = [i for i in stock_ranges if not np.allclose(stock_ranges[i], fast_ranges[i], rtol=1e-6, atol=1e-7)]
    assert len(differ) < len(stock_ranges) // 4
    for i in differ:
        # Only inputs of a two-input op (the residual ADD), and the stock range is the wider one.
        assert i in add_inputs
        assert stock_ranges[i][0] <= fast_ranges[i][0] and stock_ranges[i][1] >= fast_ranges[i][1]


def test_fast_calibration_is_as_accurate_on_real_images(trained_run, calibration, digits, tmp_path):
    from pipeline.data import discover
    from pipeline.preprocessing import preprocess_file

    items = discover(digits["val"]).items[::3]
    x = np.stack([preprocess_file(i.path, calibration.spec) for i in items])
    labels = np.asarray([trained_run.classes.index(i.label) for i in items])
    source = load_source(trained_run.model_path)
    reference = float_outputs(source, x)
    results = {}
    for method in ("stock", "fast"):
        settings = ConvertSettings("int8", calibrator=method, optimize=False, input_convention="signed_unit")
        r = export_tflite(trained_run.model_path, settings, out=tmp_path / f"{method}.tflite",
                          representative=calibration, source=source)
        out, _ = _outputs(r.model_bytes, x)
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
