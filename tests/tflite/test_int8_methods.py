"""Bias correction and learned weight rounding on the trained tiny model: what the maths guarantees.

The layers' outputs are recomputed here with a plain sliding-window
convolution (not the modules' tap sums), from the tensors each model really
feeds the layer on the calibration images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.conversion.export import ConvertSettings, export_tflite
from pipeline.core.artifacts import manifest_path_for
from pipeline.core.preprocessing import quantize
from pipeline.tflite import flatbuffers
from pipeline.tflite.bias_correction import bias_quanta, correct_biases
from pipeline.tflite.layers import expose_tensors
from pipeline.tflite.runtime import open_interpreter
from pipeline.tflite.rewrites import delegate_partitions
from pipeline.tflite.activation_ranges import BINS, best_range, counts, expected_error
from pipeline.tflite.weight_rounding import learn_rounding
from pipeline.tflite.weighted_layers import Constants, weighted_layers
from pipeline.validation.validate import validate
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def models(trained_tflite, calibration):
    quant = trained_tflite["int8"].read_bytes()
    floating = trained_tflite["float"].read_bytes()
    inputs = [calibration.with_convention("pixels").inputs(i) for i in range(len(calibration))]
    return quant, floating, inputs


def _values(model_bytes: bytes, tensors, inputs) -> dict[int, list[np.ndarray]]:
    """The stored values of ``tensors`` for each input (each model's own input quantization applied)."""
    interpreter = open_interpreter(expose_tensors(model_bytes, tensors))
    detail = interpreter.get_input_details()[0]
    found: dict[int, list[np.ndarray]] = {int(t): [] for t in tensors}
    for x in inputs:
        interpreter.set_tensor(detail["index"], quantize(x[None], detail["dtype"], *detail["quantization"]))
        interpreter.invoke()
        for t in found:
            found[t].append(interpreter.get_tensor(t)[0].astype(np.float64))
    return found


def _layer_output(x: np.ndarray, weights: np.ndarray, layer) -> np.ndarray:
    """positions x channels: the layer's output before bias, by sliding windows (TFLite's SAME/VALID padding)."""
    w = weights.astype(np.float64)
    if layer.op == "FULLY_CONNECTED":
        return x.reshape(-1, w.shape[-1]) @ w.reshape(w.shape[0], -1).T
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.stride, layer.dilation
    reach_h, reach_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if layer.same_padding:
        out_h, out_w = -(-x.shape[0] // sh), -(-x.shape[1] // sw)
        pad_h = max((out_h - 1) * sh + reach_h - x.shape[0], 0)
        pad_w = max((out_w - 1) * sw + reach_w - x.shape[1], 0)
        x = np.pad(x, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (reach_h, reach_w), axis=(0, 1))[::sh, ::sw, :, ::dh, ::dw]
    if layer.op == "DEPTHWISE_CONV_2D":
        windows = np.repeat(windows, layer.multiplier, axis=2)
        out = np.einsum("xyckl,klc->xyc", windows, w[0])
    else:
        out = np.einsum("xyckl,oklc->xyo", windows, w)
    return out.reshape(-1, out.shape[-1])


def _mean_shifts(quant: bytes, floating: bytes, inputs) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per layer with a bias: (name, mean output shift per channel, bias quantum per channel) over ``inputs``."""
    layers = [layer for layer in weighted_layers(quant, floating) if layer.quant_bias is not None]
    q_values = _values(quant, {layer.quant_input for layer in layers}, inputs)
    f_values = _values(floating, {layer.float_input for layer in layers}, inputs)
    qc, fc = Constants(quant), Constants(floating)
    found = []
    for layer in layers:
        zero = qc.quantization(layer.quant_input)[1][0]
        quantum = bias_quanta(qc, layer)
        q_out = np.concatenate([_layer_output(x - zero, qc.view(layer.quant_weights), layer)
                                for x in q_values[layer.quant_input]])
        f_out = np.concatenate([_layer_output(x, fc.view(layer.float_weights), layer)
                                for x in f_values[layer.float_input]])
        f_bias = fc.view(layer.float_bias).astype(np.float64) if layer.float_bias is not None else 0.0
        shift = quantum * (q_out.mean(axis=0) + qc.view(layer.quant_bias)) - (f_out.mean(axis=0) + f_bias)
        found.append((layer.name, shift, quantum))
    return found


def test_bias_correction_zeroes_the_mean_output_shift_on_the_calibration_set(models):
    quant, floating, inputs = models
    inputs = inputs[:16]
    before = _mean_shifts(quant, floating, inputs)
    assert any(np.any(np.abs(shift) > quantum / 2) for _, shift, quantum in before)  # there is a shift to correct
    corrected, report = correct_biases(quant, floating, inputs)
    after = _mean_shifts(corrected, floating, inputs)
    assert [name for name, _, _ in after] == [name for name, _, _ in before] and len(after) == len(report.layers)
    for name, shift, quantum in after:  # within half a bias quantum, up to float64 rounding of the means
        assert np.all(np.abs(shift) <= quantum / 2 * (1 + 1e-6) + 1e-12), name
    assert report.passes >= 2 and report.samples == 16


def test_a_spliced_model_is_corrected_after_the_splice(trained_run, models, calibration):
    """A layer kept in int16 shifts its output differently from the int8 one it replaces: the layers downstream
    are corrected on the spliced model, so every int8 layer's mean shift is within half a bias quantum there."""
    from pipeline.conversion.routes import convert_model
    from pipeline.model.modelio import load_source

    _, floating, inputs = models
    settings = ConvertSettings("int8", float_layers=("block3_sepconv1",), fallback="int16")
    conversion = convert_model(load_source(trained_run.model_path), settings, calibration)
    record = conversion.calibration
    assert conversion.route == "spliced" and record.fallback_method == "splice"
    (bias,) = record.int8_methods["methods"]
    assert bias["method"] == "bias-correction" and bias["samples"] == len(calibration)
    after = _mean_shifts(conversion.model, floating, inputs)
    assert len(after) == len(bias["layers"])
    for name, shift, quantum in after:
        assert np.all(np.abs(shift) <= quantum / 2 * (1 + 1e-6) + 1e-12), name


def _weight_ranges(model_bytes: bytes, layers) -> list[tuple[int, int]]:
    constants = Constants(model_bytes)
    ranges = []
    for layer in layers:
        view = constants.view(layer.quant_weights)
        start = view.__array_interface__["data"][0] - np.frombuffer(constants.data, np.uint8).__array_interface__[
            "data"][0]
        ranges.append((start, start + view.nbytes))
    return ranges


def test_learned_rounding_never_worse_than_nearest_and_stays_within_one_quantum(models):
    quant, floating, inputs = models
    inputs = inputs[:16]
    rounded, report = learn_rounding(quant, floating, inputs)
    layers = weighted_layers(quant, floating)
    f_values = _values(floating, {layer.float_input for layer in layers}, inputs)
    qc, rc, fc = Constants(quant), Constants(rounded), Constants(floating)
    improved = 0
    for layer in layers:
        scales, _, axis = qc.quantization(layer.quant_weights)
        w = fc.view(layer.float_weights).astype(np.float64)
        shape = [1] * w.ndim
        shape[axis] = -1
        exact = w / scales.reshape(shape)
        new = rc.view(layer.quant_weights).astype(np.float64)
        assert np.all((new == np.floor(exact)) | (new == np.ceil(exact))) and np.abs(new).max() <= 127, layer.name

        def error(q):
            real = q * scales.reshape(shape)
            return sum(float(np.sum((_layer_output(x, real, layer) - _layer_output(x, w, layer)) ** 2))
                       for x in f_values[layer.float_input])

        nearest, learned = error(qc.view(layer.quant_weights).astype(np.float64)), error(new)
        assert learned <= nearest * (1 + 1e-9), layer.name
        improved += learned < nearest * (1 - 1e-6)
    assert improved >= len(layers) // 2 and len(report.layers) == len(layers)
    # only weight bytes changed: same graph, scales, biases, metadata
    a, b = np.frombuffer(quant, np.uint8), np.frombuffer(rounded, np.uint8)
    assert a.shape == b.shape
    changed = np.flatnonzero(a != b)
    allowed = np.zeros(a.shape, bool)
    for start, end in _weight_ranges(quant, layers):
        allowed[start:end] = True
    assert changed.size and allowed[changed].all()


def _graph(model_bytes: bytes) -> list:
    """Ops (code, inputs, outputs, options type) and tensors (name, type, shape, scales, zero points)."""
    model = flatbuffers.read(model_bytes)
    graph = model.subgraphs[0]
    ops = [(op.opcodeIndex, list(op.inputs), list(op.outputs), op.builtinOptionsType) for op in graph.operators]
    tensors = [(t.name, t.type, list(t.shape), None if t.quantization is None or t.quantization.scale is None
                else (list(t.quantization.scale), list(t.quantization.zeroPoint))) for t in graph.tensors]
    return [ops, tensors, list(graph.inputs), list(graph.outputs)]


def test_convert_with_both_methods_keeps_the_graph_and_reports_each_layer(trained_run, calibration, digits, tmp_path):
    plain = export_tflite(trained_run.model_path, ConvertSettings("int8", bias_correction=False),
                          out=tmp_path / "plain.tflite", representative=calibration)
    heard: dict[str, list[tuple[int, int]]] = {}
    refined = export_tflite(trained_run.model_path, ConvertSettings("int8", rounding="learned", bias_correction=True),
                            out=tmp_path / "refined.tflite", representative=calibration,
                            progress=lambda done, total, step="calibration": heard.setdefault(step, []).append(
                                (done, total)))
    # each method reports its steps under its own name, after the calibration's, up to its total
    assert list(heard) == ["calibration", "learning the weight rounding", "correcting the biases"]
    for step, calls in heard.items():
        assert calls[-1][0] == calls[-1][1] and [done for done, _ in calls] == sorted(done for done, _ in calls), step
    assert refined.model_bytes != plain.model_bytes and _graph(refined.model_bytes) == _graph(plain.model_bytes)
    assert refined.manifest["ops"] == plain.manifest["ops"]
    assert delegate_partitions(refined.model_bytes) == delegate_partitions(plain.model_bytes) == 1
    manifest = json.loads(manifest_path_for(refined.path).read_text())
    methods = manifest["calibration"]["method"]["int8_methods"]
    assert [m["method"] for m in methods["methods"]] == ["learned-rounding", "bias-correction"]
    rounding, bias = methods["methods"]
    assert rounding["samples"] == min(64, len(calibration)) and bias["samples"] == len(calibration)
    assert methods["samples"] == len(calibration) and methods["seconds"] > 0
    for report in methods["methods"]:
        assert report["layers"] and all("layer" in entry for entry in report["layers"])
    assert manifest["settings"]["rounding"] == "learned" and manifest["settings"]["bias_correction"] is True
    drift = validate(trained_run.model_path, refined.path, digits["val"], tmp_path / "drift", limit=20,
                     layer_samples=0).report
    reported = drift["candidate"]["int8_methods"]
    layers = sum(len(report["layers"]) for report in methods["methods"])
    assert len(reported["layers"]) == layers and all(e["after"] <= e["before"] for e in reported["layers"])
    assert "## int8 methods" in (tmp_path / "drift" / "report.md").read_text()


def test_default_int8_corrects_biases_with_the_calibrations_float_means(trained_run, calibration, tmp_path):
    """Bias correction is the default wherever int8 calibrates on images, on every calibration image, its float
    means taken in the calibration's own pass; --no-bias-correction and the modes it cannot apply to say so."""
    default = export_tflite(trained_run.model_path, ConvertSettings("int8"), out=tmp_path / "default.tflite",
                            representative=calibration)
    assert default.manifest["settings"]["bias_correction"] is True
    methods = default.manifest["calibration"]["method"]["int8_methods"]
    (bias,) = methods["methods"]
    assert bias["method"] == "bias-correction" and bias["samples"] == len(calibration)
    assert bias["float_means"] == "calibration pass" and bias["layers"]
    off = export_tflite(trained_run.model_path, ConvertSettings("int8", bias_correction=False),
                        out=tmp_path / "off.tflite", representative=calibration)
    assert off.manifest["settings"]["bias_correction"] is False
    assert "int8_methods" not in off.manifest["calibration"]["method"]
    assert _graph(off.model_bytes) == _graph(default.model_bytes) and off.model_bytes != default.model_bytes
    wide = export_tflite(trained_run.model_path, ConvertSettings("int16x8"), out=tmp_path / "wide.tflite",
                         representative=calibration)
    assert wide.manifest["settings"]["bias_correction"] is False


def test_the_calibrations_sums_are_the_float_runs_and_correct_the_mean_shift(models, calibration):
    """The float means the fast calibrator sums in its pass are those of a float run of their own (float32 sums:
    within float rounding), and bias correction from them takes every layer's mean shift to half a bias quantum
    (up to that rounding, far below a quantum)."""
    from pipeline.conversion.converter_hooks import fast_minmax
    from pipeline.tflite.weighted_layers import pointwise_inputs, pool, sum_exposing, weighted_inputs

    quant, floating, inputs = models
    inputs = inputs[:16]
    tensors = weighted_inputs(floating)
    pooled = pointwise_inputs(floating)
    assert tensors and pooled and set(tensors) - pooled  # both kinds of sums are checked
    _, info, sums = fast_minmax(floating, ([x[None]] for x in inputs), summed=tensors)
    own, count = sum_exposing(floating, tensors, inputs)
    assert sums is not None and sums.count == count == len(inputs) == info["samples"]
    values = _values(floating, tensors, inputs)
    for t in tensors:  # n float32 additions of terms at most M: error at most n * n * 2**-24 * M
        top = max(np.abs(v).max() for v in values[t])
        if t in pooled:  # n * positions terms added in float32, then divided by the positions
            positions = values[t][0].size // values[t][0].shape[-1]
            expected, bound = pool(own[t]), (len(inputs) * positions) ** 2 * 2 ** -24 * top / positions
        else:
            expected, bound = own[t], len(inputs) ** 2 * 2 ** -24 * top
        assert sums.sums[t].shape == expected.shape
        np.testing.assert_allclose(sums.sums[t], expected, rtol=0, atol=bound)
    corrected, report = correct_biases(quant, floating, inputs, float_sums=sums)
    assert report.float_means == "calibration pass"
    assert correct_biases(quant, floating, inputs)[1].float_means == "own float run"
    for name, shift, quantum in _mean_shifts(corrected, floating, inputs):
        assert np.all(np.abs(shift) <= quantum / 2 * 1.001 + 1e-9), name


def test_cli_refuses_the_methods_outside_int8(trained_run, tmp_path):
    proc = run_cli("convert", trained_run.model_path, "--fp16", "--bias-correction", "--out", tmp_path / "m.tflite")
    assert proc.returncode == 2 and "--bias-correction" in proc.stderr and "Traceback" not in proc.stderr


def test_error_chosen_range_never_has_more_expected_error_and_clips_an_outlier():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 100_000), [40.0]])  # one outlier sets min/max's scale
    low, high = float(values.min()), float(values.max())
    edges = np.linspace(low, high, BINS + 1)
    hist = np.histogram(values, BINS, range=(low, high))[0].astype(float)
    new_low, new_high, error, full = best_range(hist, edges, low, high)
    assert error <= full and error == expected_error(hist, edges, new_low, new_high)
    assert low <= new_low <= 0 <= new_high < high  # clipped inside the seen range, zero kept
    relu = np.histogram(np.abs(values), BINS, range=(0.0, high))[0].astype(float)
    assert best_range(relu, np.linspace(0.0, high, BINS + 1), 0.0, high)[0] == 0.0  # a ReLU output keeps 0


def test_mse_ranges_keep_the_graph(trained_run, calibration, tmp_path):
    plain = export_tflite(trained_run.model_path, ConvertSettings("int8", bias_correction=False),
                          out=tmp_path / "plain.tflite", representative=calibration)
    heard: dict[str, list[int]] = {}
    ranged = export_tflite(trained_run.model_path, ConvertSettings("int8", ranges="mse"), out=tmp_path / "r.tflite",
                           representative=calibration,
                           progress=lambda done, total, step="calibration": heard.setdefault(step, []).append(done))
    # the range search counts each image once, under its own name, after the calibration pass
    assert list(heard) == ["calibration", "choosing the activation ranges", "correcting the biases"]
    assert heard["choosing the activation ranges"] == list(range(1, len(calibration) + 1))
    assert heard["calibration"] == list(range(1, len(calibration) + 1))
    assert ranged.manifest["ops"] == plain.manifest["ops"]
    assert ranged.manifest["xnnpack"]["partitions"] == plain.manifest["xnnpack"]["partitions"] == 1
    record = ranged.manifest["calibration"]["method"]["ranges"]
    assert ranged.manifest["calibration"]["method"]["seconds"] >= record["seconds"] > 0  # the search is part of it
    assert record["clipped"] == len(record["tensors"]) > 0
    for entry in record["tensors"]:
        (low, high), (new_low, new_high) = entry["minmax"], entry["range"]
        assert low <= new_low <= new_high <= high and entry["error_ratio"] <= 1


def test_range_search_counts_bin_as_numpy_away_from_the_edges_and_keep_every_value():
    """Values at bin centres land in numpy's bins exactly; values outside [low, high] in the end bins."""
    low, high = -1.5, 4.25
    width = (high - low) / BINS
    centres = (low + (np.arange(BINS) + 0.5) * width).astype(np.float32)
    x = np.repeat(centres, np.arange(BINS) % 7)
    assert np.array_equal(counts(x, low, high), np.histogram(x, BINS, range=(low, high))[0])
    outside = counts(np.array([low - 1, high + 1, high], np.float32), low, high)
    assert outside[0] == 1 and outside[-1] == 2 and outside.sum() == 3
