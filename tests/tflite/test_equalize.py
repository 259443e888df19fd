"""Cross-layer equalization: exact in float for each pair it takes, balanced ranges, and pairs it must not take
left byte for byte.

The tiny models are Keras layers converted by the project's own float route, so the graphs are the ones the
converter really writes (fused ReLU, depthwise then 1x1 conv for a SeparableConv2D, fully connected layers).
Their weights have per-channel magnitudes spread over three decades, so equalizing moves them.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.conversion import routes
from pipeline.conversion.export import ConvertSettings, convert_bytes, export_tflite
from pipeline.core.errors import SettingsError
from pipeline.model.modelio import load_source
from pipeline.tflite import flatbuffers
from pipeline.tflite.equalize import SUFFIX, equalize
from pipeline.tflite.flatbuffers import text
from pipeline.tflite.runtime import open_interpreter
from pipeline.validation.validate import validate
from tests.conftest import invoke_cli

SIZE = 8
# Output channel / input channel axis of each weighted op's weights: CONV_2D [o,h,w,i], DEPTHWISE [1,h,w,o], FC [o,i]
OUT_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}
IN_AXIS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 1}


def _spread_weights(model, seed: int) -> None:
    """Random weights and biases, each output channel scaled by a factor between 0.01 and 10."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        kernel = rng.normal(0, 1, weights[0].shape) * 10 ** rng.uniform(-2, 1, weights[0].shape[-1])
        rest = [rng.normal(0, 0.5, w.shape) for w in weights[1:]]
        layer.set_weights([kernel.astype("f")] + [w.astype("f") for w in rest])


def _build(name: str):
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    if name == "conv-relu-conv":
        x = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)
        x = keras.layers.Conv2D(5, 3, name="c2")(x)
    elif name == "depthwise-conv1x1":
        x = keras.layers.SeparableConv2D(6, 3, name="sep")(inputs)
    elif name == "fc-relu-fc":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
        x = keras.layers.Dense(6, activation="relu", name="d1")(x)
        x = keras.layers.Dense(3, name="d2")(x)
    elif name == "separable-chain":  # DW -> CONV(relu) -> DW -> CONV: the middle layers are in two pairs, and
        # the two depthwise convs' zero biases are one tensor in the converted model
        x = keras.layers.SeparableConv2D(3, 3, activation="relu", name="sep1")(inputs)
        x = keras.layers.SeparableConv2D(5, 3, name="sep2")(x)
    elif name == "relu6":
        x = keras.layers.Conv2D(4, 3, activation="relu6", name="c1")(inputs)
        x = keras.layers.Conv2D(5, 3, name="c2")(x)
    elif name == "two-readers":
        x = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)
        x = keras.layers.Add(name="add")([keras.layers.Conv2D(5, 3, name="a")(x),
                                          keras.layers.Conv2D(5, 3, name="b")(x)])
    if len(x.shape) == 4:  # the loader takes (batch, classes) outputs
        x = keras.layers.GlobalAveragePooling2D(name="head")(x)
    model = keras.Model(inputs, x)
    _spread_weights(model, seed=len(name))
    return model


PATTERNS = ("conv-relu-conv", "depthwise-conv1x1", "fc-relu-fc", "separable-chain", "relu6", "two-readers")


@pytest.fixture(scope="module")
def floats(tmp_path_factory) -> dict[str, bytes]:
    """Each pattern as a float .tflite from the project's float route."""
    out = tmp_path_factory.mktemp("equalize")
    found = {}
    for name in PATTERNS:
        path = out / f"{name}.keras"
        _build(name).save(path)
        found[name] = convert_bytes(load_source(path), ConvertSettings("float", input_convention="signed_unit"))
    return found


def _run(model_bytes: bytes, inputs: np.ndarray) -> np.ndarray:
    interpreter = open_interpreter(model_bytes)
    detail, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    found = []
    for x in inputs:
        interpreter.set_tensor(detail["index"], x[None].astype(np.float32))
        interpreter.invoke()
        found.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(found)


def _weighted(model_bytes: bytes) -> list[tuple[str, np.ndarray]]:
    """(op, float weights) of each weighted op, in graph order."""
    model = flatbuffers.read(model_bytes)
    graph, found = model.subgraphs[0], []
    for op in graph.operators:
        kind = flatbuffers.op_name(model, op)
        if kind in OUT_AXIS:
            tensor = graph.tensors[int(op.inputs[1])]
            raw = np.asarray(model.buffers[int(tensor.buffer)].data, dtype=np.uint8).tobytes()
            found.append((kind, np.frombuffer(raw, np.float32).reshape([int(s) for s in tensor.shape])))
    return found


def _ranges(values: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(np.abs(values), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


@pytest.mark.parametrize("name", ["conv-relu-conv", "depthwise-conv1x1", "fc-relu-fc", "separable-chain"])
def test_equalized_model_computes_the_same_function(floats, name):
    """Each balanced pair computes what it did: the outputs agree within float32 rounding of the rescaled
    weights (a few units in the last place of the largest output, summed over the few layers)."""
    equalized, report = equalize(floats[name])
    assert len(report.pairs) == {"separable-chain": 3}.get(name, 1) and equalized != floats[name]
    inputs = np.random.default_rng(0).uniform(-1, 1, (16, SIZE, SIZE, 3))
    before, after = _run(floats[name], inputs), _run(equalized, inputs)
    scale = np.abs(before).max()
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * scale)
    assert scale > 0 and np.abs(before).min() < scale  # the outputs vary: the check has something to compare


@pytest.mark.parametrize("name", ["conv-relu-conv", "depthwise-conv1x1", "fc-relu-fc"])
def test_a_pairs_channel_ranges_end_balanced(floats, name):
    """For one pair, s_c = sqrt(r1_c / r2_c) leaves the first layer's output-channel range and the second's
    input-channel range equal, sqrt(r1_c * r2_c), per channel (they were far apart before)."""
    (kind1, w1), (kind2, w2) = _weighted(floats[name])[-2:]
    r1, r2 = _ranges(w1, OUT_AXIS[kind1]), _ranges(w2, IN_AXIS[kind2])
    assert np.max(np.maximum(r1 / r2, r2 / r1)) > 2  # not balanced to begin with
    equalized, report = equalize(floats[name])
    assert len(report.pairs) == 1 and report.pairs[0].ops == f"{kind1} -> {kind2}"
    (_, e1), (_, e2) = _weighted(equalized)[-2:]
    after1, after2 = _ranges(e1, OUT_AXIS[kind1]), _ranges(e2, IN_AXIS[kind2])
    np.testing.assert_allclose(after1, after2, rtol=1e-6)
    np.testing.assert_allclose(after1, np.sqrt(r1.astype(np.float64) * r2), rtol=1e-6)


def test_the_balanced_tensor_is_renamed(floats):
    """The middle tensor holds other values now, so it must not pair by name with the unequalized model's."""
    equalized, _ = equalize(floats["conv-relu-conv"])
    graph = flatbuffers.read(equalized).subgraphs[0]
    names = [t.name.decode() for t in graph.tensors]
    assert sum(n.endswith(SUFFIX) for n in names) == 1


@pytest.mark.parametrize("name, clipping", [("relu6", 1), ("two-readers", 0)])
def test_pairs_it_cannot_take_exactly_are_left_byte_for_byte(floats, name, clipping):
    """RELU6 clips at a fixed value (no scale commutes with it); a tensor read twice cannot take two scalings."""
    equalized, report = equalize(floats[name])
    assert equalized == floats[name] and not report.pairs
    assert report.skipped_clipping == clipping


def test_int8_equalizes_only_when_asked_and_records_it(trained_run, calibration, tmp_path):
    """The staged int8 route equalizes the float model it calibrates when ``equalize`` is set, and the manifest's
    calibration method says which pairs; the default leaves it out."""
    asked = export_tflite(trained_run.model_path, ConvertSettings("int8", equalize=True),
                          out=tmp_path / "cle.tflite", representative=calibration)
    record = asked.manifest["calibration"]["method"]["equalize"]
    assert asked.manifest["settings"]["equalize"] is True
    assert record["applied"] and record["pairs"] == len(record["layers"]) > 0
    assert any(entry["ops"] == "DEPTHWISE_CONV_2D -> CONV_2D" for entry in record["layers"])
    default = export_tflite(trained_run.model_path, ConvertSettings("int8"), out=tmp_path / "default.tflite",
                            representative=calibration)
    assert "equalize" not in default.manifest["calibration"]["method"]
    assert default.model_bytes != asked.model_bytes


def test_the_per_layer_report_pairs_the_equalized_tensors(trained_run, calibration, digits, tmp_path):
    """A balanced pair's middle tensor holds per-channel rescaled values under a new name; the report's float model
    is equalized as the candidate was, so those tensors are compared too (with the plain twin they would not
    pair at all), within the error the other layers show; and the drift report lists the pairs."""
    asked = export_tflite(trained_run.model_path, ConvertSettings("int8", equalize=True),
                          out=tmp_path / "cle.tflite", representative=calibration)
    renamed = {text(t.name) for t in flatbuffers.read(asked.model_bytes).subgraphs[0].tensors
               if text(t.name).endswith(SUFFIX)}
    assert renamed
    report = validate(trained_run.model_path, asked.path, digits["val"], tmp_path / "report", limit=20,
                      layer_samples=4).report
    layers = report["layers"]
    # the drift report also says what equalizing changed, pair by pair, as the manifest records it
    recorded = asked.manifest["calibration"]["method"]["equalize"]
    methods = report["candidate"]["int8_methods"]
    assert methods["equalize"]["pairs"] == recorded["pairs"] > 0
    rows = [row for row in methods["layers"] if row["method"] == "equalize"]
    assert [(row["before"], row["after"]) for row in rows] == [
        (pair["spread_before"], pair["spread_after"]) for pair in recorded["layers"]]
    assert "Cross-layer equalization" in (tmp_path / "report" / "report.md").read_text()
    assert layers["status"] == "ok" and "equalized as in the candidate" in layers["float_model"]
    compared = {row["tensor"]: row for row in layers["all"]}
    paired = renamed & set(compared)
    assert paired  # each is an op output with a scale: every one a depthwise or conv output of a balanced pair
    others = [row["rmse_over_scale"] for name, row in compared.items() if name not in renamed]
    assert all(compared[name]["rmse_over_scale"] <= 4 * max(others) for name in paired)


def test_a_graph_equalizing_cannot_read_converts_unequalized_and_says_why(trained_run, calibration, tmp_path):
    """Equalizing is exact and optional, as the fold is: where it fails on a graph, the conversion goes on with
    the model as it is (the same bytes as without it), and the manifest says why."""

    def unreadable(model: bytes):
        raise KeyError(17)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routes, "equalize", unreadable)
        asked = export_tflite(trained_run.model_path, ConvertSettings("int8", equalize=True),
                              out=tmp_path / "cle.tflite", representative=calibration)
    assert asked.manifest["calibration"]["method"]["equalize"] == {
        "applied": False, "reason": "equalizing could not read this graph (KeyError: 17)"}
    default = export_tflite(trained_run.model_path, ConvertSettings("int8"), out=tmp_path / "default.tflite",
                            representative=calibration)
    assert asked.model_bytes == default.model_bytes


def test_equalization_is_an_int8_setting(tmp_path):
    """Only int8 calibrates the float model it rewrites: the library refuses it elsewhere naming the setting, the CLI
    adds the flag."""
    with pytest.raises(SettingsError) as caught:
        ConvertSettings("int16x8", equalize=True)
    assert caught.value.setting == "equalize" and "--" not in str(caught.value)
    proc = invoke_cli("convert", tmp_path / "m.keras", "--fp16", "--equalize", "--out", tmp_path / "m.tflite")
    assert proc.returncode == 2 and "--equalize" in proc.stderr and "Traceback" not in proc.stderr
