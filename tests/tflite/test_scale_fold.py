"""Folding a per-channel multiplier after a ReLU into the layer before it: exact in float, and what it buys in int8.

The models are Keras ``Conv2D(relu) -> BatchNormalization`` (BatchNorm after the
activation, which the converter cannot fold into the conv), converted by the
project's own float route; the patterns that must not fold are written as
TensorFlow functions so that the converter gives exactly that graph.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibrate.dataset import CalibrationSet
from pipeline.conversion import routes
from pipeline.conversion.export import ConvertSettings, convert_bytes, convert_model, export_tflite
from pipeline.core.artifacts import manifest_path_for
from pipeline.core.preprocessing import PreprocessSpec
from pipeline.model.modelio import load_source
from pipeline.tflite import flatbuffers
from pipeline.tflite.runtime import open_interpreter
from pipeline.tflite.scale_fold import FoldReport, fold_scales
from pipeline.tflite import twin as twin_module
from pipeline.tflite.twin import Twin, float_twin
from pipeline.validation.layer_error import layer_errors

SIZE = 8
EPS = 1e-3  # Keras' BatchNormalization epsilon


def _bn_model(path, multipliers, offsets, conv_weights, head: bool, conv_bias=None):
    """Input -> Conv2D(1x1, relu) -> BatchNormalization (multiplier a_k, offset d_k) -> GAP [-> Dense], saved."""
    import keras

    channels = len(multipliers)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(channels, 1, activation="relu", name="conv")(inputs)
    x = keras.layers.BatchNormalization(epsilon=EPS, name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if head:
        x = keras.layers.Dense(5, name="dense")(x)
    model = keras.Model(inputs, x)
    model.get_layer("conv").set_weights([np.asarray(conv_weights, "f").reshape(1, 1, 3, channels),
                                         np.zeros(channels, "f") if conv_bias is None else np.asarray(conv_bias, "f")])
    a, d = np.asarray(multipliers, "f"), np.asarray(offsets, "f")
    variance = np.ones(channels, "f")
    model.get_layer("bn").set_weights([a * np.sqrt(1 + EPS).astype("f"), d, np.zeros(channels, "f"), variance])
    if head:
        dense = model.get_layer("dense")
        rng = np.random.default_rng(1)
        dense.set_weights([rng.normal(0, 1, (channels, 5)).astype("f"), rng.normal(0, 1, 5).astype("f")])
    model.save(path)
    return path


def _float_tflite(path) -> bytes:
    return convert_bytes(load_source(path), ConvertSettings("float", input_convention="signed_unit"))


def _run(model_bytes: bytes, inputs: np.ndarray) -> np.ndarray:
    interpreter = open_interpreter(model_bytes)
    detail, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    found = []
    for x in inputs:
        interpreter.set_tensor(detail["index"], x[None].astype(detail["dtype"]))
        interpreter.invoke()
        found.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(found)


def _ops(model_bytes: bytes) -> list[str]:
    model = flatbuffers.read(model_bytes)
    return [flatbuffers.op_name(model, op) for op in model.subgraphs[0].operators]


def _mul_constant(model_bytes: bytes) -> np.ndarray:
    """The constant operand of the model's one MUL, as stored (float, or int8 with its scale and zero point)."""
    model = flatbuffers.read(model_bytes)
    graph = model.subgraphs[0]
    mul = next(op for op in graph.operators if flatbuffers.op_name(model, op) == "MUL")
    for t in mul.inputs:
        data = model.buffers[graph.tensors[t].buffer].data
        if data is not None and len(data):
            kind = flatbuffers.type_names()[graph.tensors[t].type]
            values = np.frombuffer(bytes(data), {"FLOAT32": np.float32, "INT8": np.int8}[kind])
            q = graph.tensors[t].quantization
            return values if kind == "FLOAT32" else (values.astype(np.float64) - q.zeroPoint[0]) * q.scale[0]
    raise AssertionError("the MUL has no constant operand")


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale_fold")
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 1, (3, 6))
    positive = [1e-3, 10.0, 0.5, 2e-3, 3.0, 1.0]
    signed = [1e-3, -10.0, 0.0, 2e-3, -0.5, 7.0]
    offsets = [0.5, -0.25, 0.125, 0.0, 1.0, -1.0]
    bias = np.linspace(-0.2, 0.3, 6)
    return {"positive": _float_tflite(_bn_model(out / "positive.keras", positive, offsets, weights, True, bias)),
            "signed": _float_tflite(_bn_model(out / "signed.keras", signed, offsets, weights, True, bias))}


def _assert_same_function(before: bytes, after: bytes) -> None:
    inputs = np.random.default_rng(2).uniform(-1, 1, (16, SIZE, SIZE, 3)).astype(np.float32)
    want, got = _run(before, inputs), _run(after, inputs)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_positive_multipliers_fold_into_the_conv_and_the_mul_is_removed(keras_models):
    before = keras_models["positive"]
    assert _ops(before).count("MUL") == 1  # the converter left the BatchNorm after the ReLU as MUL, ADD
    after, report = fold_scales(before)
    assert "MUL" not in _ops(after) and len(_ops(after)) == len(_ops(before)) - 1
    assert report.to_dict()["folded"] == 1 and report.layers[0].layer == "conv"
    assert report.layers[0].mul_removed and report.layers[0].channels == 6
    _assert_same_function(before, after)


def test_negative_and_zero_multipliers_leave_only_their_signs_in_the_mul(keras_models):
    before = keras_models["signed"]
    after, report = fold_scales(before)
    assert _ops(after).count("MUL") == 1 and not report.layers[0].mul_removed
    assert (report.layers[0].negative, report.layers[0].zero) == (2, 1)
    np.testing.assert_array_equal(_mul_constant(after), [1, -1, 0, 1, -1, 1])
    _assert_same_function(before, after)


def _function_tflite(body, channels: int = 4) -> bytes:
    """A float .tflite of ``body(conv_output_before_activation)`` after a 1x1 conv, as the converter makes it."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    kernel = tf.constant(rng.normal(0, 1, (1, 1, 3, channels)).astype("f"))
    bias = tf.constant(rng.normal(0, 1, channels).astype("f"))

    @tf.function(input_signature=[tf.TensorSpec((1, SIZE, SIZE, 3), tf.float32)])
    def serve(x):
        return body(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "VALID"), bias))

    return bytes(tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()]).convert())


def _unfoldable():
    import tensorflow as tf

    per_channel = tf.constant(np.asarray([1e-3, 2.0, 0.5, 3.0], "f"))
    per_position = tf.constant(np.linspace(0.1, 2, SIZE * SIZE).reshape(1, SIZE, SIZE, 1).astype("f"))
    return {
        "relu6": lambda z: tf.reduce_mean(tf.nn.relu6(z) * per_channel + 1.0, axis=(1, 2)),
        "per-position constant": lambda z: tf.reduce_mean(tf.nn.relu(z) * per_position, axis=(1, 2)),
        "output read twice": lambda z: tf.reduce_mean(tf.nn.relu(z) * per_channel + tf.nn.relu(z), axis=(1, 2)),
    }


@pytest.mark.parametrize("case", ["relu6", "per-position constant", "output read twice"])
def test_patterns_that_do_not_commute_are_left_byte_identical(case):
    model = _function_tflite(_unfoldable()[case])
    assert "MUL" in _ops(model)
    folded, report = fold_scales(model)
    assert folded == model and report == FoldReport()


# Channel k reads input channel k % 3 with gain 1 / a_k, so a_k * ReLU(...) spans [0, 1] on every channel (what a
# BatchNorm after a ReLU does: its multiplier is small where the ReLU's output is large). Channel 1's multiplier is
# 1e-4 of channel 0's: one int8 scale for all four multipliers cannot hold it.
MULTIPLIERS = [10.0, 1e-3, 1.0, 1 / 3]
OFFSETS = [0.5, -0.25, 0.125, 0.0]


def _calibration(root) -> CalibrationSet:
    """Pixels at both ends (every conv output reaches its range) and random ones, as [-1, 1] inputs."""
    rng = np.random.default_rng(4)
    images = [np.full((SIZE, SIZE, 3), 255, np.uint8), np.zeros((SIZE, SIZE, 3), np.uint8)]
    images += [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(6)]
    return CalibrationSet(root=root, spec=PreprocessSpec(size=SIZE), seed=0, requested=len(images), samples=images)


@pytest.fixture(scope="module")
def int8_pair(tmp_path_factory):
    """The model in float, and in int8 with and without the fold (the route's fold replaced by none)."""
    out = tmp_path_factory.mktemp("scale_fold_int8")
    weights = np.zeros((3, 4))
    for k, a in enumerate(MULTIPLIERS):
        weights[k % 3, k] = 1 / a
    path = _bn_model(out / "bn_after_relu.keras", MULTIPLIERS, OFFSETS, weights, head=False)
    settings = ConvertSettings("int8", input_convention="signed_unit")
    folded = export_tflite(path, settings, out=out / "folded.tflite", representative=_calibration(out))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routes, "fold_scales", lambda model: (model, FoldReport()))
        plain = export_tflite(path, settings, out=out / "plain.tflite", representative=_calibration(out))
    return {"float": _float_tflite(path), "folded": folded.path, "plain": plain.path, "keras": path,
            "calibration": _calibration(out)}


def _grid_inputs(int8_model: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(integer inputs, the float values they stand for): random levels within [-1, 1], plus both ends."""
    detail = open_interpreter(int8_model).get_input_details()[0]
    scale, zero = detail["quantization"]
    low, high = int(np.ceil(zero - 1 / scale)), int(np.floor(zero + 1 / scale))
    levels = np.random.default_rng(5).integers(low, high + 1, (14, SIZE, SIZE, 3))
    levels = np.concatenate([levels, np.full((1, SIZE, SIZE, 3), low), np.full((1, SIZE, SIZE, 3), high)])
    return levels, ((levels - zero) * scale).astype(np.float32)


def _dequantized_outputs(int8_model: bytes, levels: np.ndarray) -> np.ndarray:
    detail = open_interpreter(int8_model).get_output_details()[0]
    scale, zero = detail["quantization"]
    return (_run(int8_model, levels).astype(np.float64) - zero) * scale


def _error_bound(int8_model: bytes) -> float:
    """What rounding can cost on this model, from its own scales: inputs on the grid (no input error), a conv
    of 3 inputs with |x| <= 1 (half a weight step each; its bias is 0, exactly quantized), the ADD's constant
    (half its step), and one output step for every op that requantizes (half a step of rounding, plus its
    fixed-point rescaling, which stays below another half)."""
    model = flatbuffers.read(int8_model)
    graph = model.subgraphs[0]
    bound = 0.0
    for op in graph.operators:
        name = flatbuffers.op_name(model, op)
        bound += float(graph.tensors[op.outputs[0]].quantization.scale[0])
        if name == "CONV_2D":
            bound += 3 * float(np.max(graph.tensors[op.inputs[1]].quantization.scale)) / 2
        if name == "ADD":
            constant = next(t for t in op.inputs if model.buffers[graph.tensors[t].buffer].data is not None)
            bound += float(graph.tensors[constant].quantization.scale[0]) / 2
    return bound


def test_int8_keeps_the_channels_a_shared_multiplier_scale_loses(int8_pair):
    plain, folded = int8_pair["plain"].read_bytes(), int8_pair["folded"].read_bytes()
    levels, inputs = _grid_inputs(folded)
    want = _run(int8_pair["float"], inputs).astype(np.float64)
    # Unfolded: channel 1's multiplier is 0 in int8, so that output ignores the input, while the float one spans
    # [d, d + 1] over these inputs (the last two are all -1 and all 1): one of them is off by at least 0.5.
    assert _mul_constant(plain)[1] == 0
    plain_levels, plain_inputs = _grid_inputs(plain)
    lost, spans = _dequantized_outputs(plain, plain_levels)[:, 1], _run(int8_pair["float"], plain_inputs)[:, 1]
    assert np.ptp(lost) == 0 and np.ptp(spans) > 0.9  # the top level is within one input step of 1
    assert np.abs(lost - spans).max() >= np.ptp(spans) / 2 > 0.45
    # Folded: no MUL left, and every output within what the model's own scales allow.
    assert "MUL" not in _ops(folded)
    error = np.abs(_dequantized_outputs(folded, levels) - want)
    assert error.max() <= _error_bound(folded) < 0.25


def test_the_manifest_records_the_fold(int8_pair):
    manifest = json.loads(manifest_path_for(int8_pair["folded"]).read_text())
    fold = manifest["calibration"]["method"]["scale_fold"]
    assert fold["applied"] and fold["folded"] == 1 and fold["muls_removed"] == 1
    assert fold["layers"] == [{"layer": "conv", "op": "CONV_2D", "channels": 4, "negative": 0, "zero": 0,
                               "mul_removed": True}]


def test_a_graph_the_fold_cannot_read_converts_unfolded_and_says_why(int8_pair, tmp_path):
    """The fold is exact and optional: where it fails on a graph, the conversion goes on with the model as it is,
    the same bytes as a conversion that folds nothing, and the manifest says why."""

    def unreadable(model: bytes):
        raise IndexError("operator 7 reads tensor 90 of 12")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routes, "fold_scales", unreadable)
        found = export_tflite(int8_pair["keras"], ConvertSettings("int8", input_convention="signed_unit"),
                              out=tmp_path / "m.tflite", representative=int8_pair["calibration"])
    fold = found.manifest["calibration"]["method"]["scale_fold"]
    assert fold == {"applied": False, "reason": "the fold could not read this graph (IndexError: operator 7 reads "
                                                 "tensor 90 of 12)"}
    assert found.model_bytes == int8_pair["plain"].read_bytes()


def _float_ops(model_bytes: bytes) -> list[str]:
    """The ops whose weights (input 1) are float32: what was kept out of int8."""
    model = flatbuffers.read(model_bytes)
    graph = model.subgraphs[0]
    return [flatbuffers.op_name(model, op) for op in graph.operators if len(op.inputs) > 1
            and model.buffers[graph.tensors[op.inputs[1]].buffer].data is not None
            and flatbuffers.type_names()[graph.tensors[op.inputs[1]].type] == "FLOAT32"]


@pytest.mark.parametrize("layer, kept", [("conv", ["CONV_2D"]), ("bn", ["ADD"])])
def test_a_layer_of_the_folded_model_is_kept_in_float_by_its_keras_name(int8_pair, layer, kept):
    """The folded conv still reads as its layer; the BatchNorm's layer is its ADD once its MUL is gone."""
    settings = ConvertSettings("int8", input_convention="signed_unit", float_layers=(layer,))
    conversion = convert_model(load_source(int8_pair["keras"]), settings, int8_pair["calibration"])
    record = conversion.calibration
    assert record.scale_fold["folded"] == 1 and record.float_layers == [layer] and len(record.denylisted_nodes) == 1
    assert _float_ops(conversion.model) == kept and "MUL" not in _ops(conversion.model)


def test_layers_spliced_from_int16x8_come_with_an_unfolded_int8_model(int8_pair):
    """The int16x8 donor is converted from the Keras model unfolded: the int8 model it is spliced into is too, so
    the spliced BatchNorm multiplies what its own conv computes, not a folded conv's output."""
    settings = ConvertSettings("int8", input_convention="signed_unit", float_layers=("bn",), fallback="int16")
    conversion = convert_model(load_source(int8_pair["keras"]), settings, int8_pair["calibration"])
    assert conversion.route == "spliced" and conversion.calibration.scale_fold["applied"] is False
    model = flatbuffers.read(conversion.model)
    graph = model.subgraphs[0]
    conv = next(op for op in graph.operators if flatbuffers.op_name(model, op) == "CONV_2D")
    weights = graph.tensors[conv.inputs[1]]
    steps = np.asarray(weights.quantization.scale)
    stored = np.frombuffer(bytes(model.buffers[weights.buffer].data), np.int8).reshape(4, 3) * steps[:, None]
    gains = np.abs(stored).max(axis=1)  # channel k's one weight: 1 / a_k unfolded, 1 folded
    assert np.all(np.abs(gains - 1 / np.asarray(MULTIPLIERS)) <= steps / 2 * (1 + 1e-6))


def test_per_layer_error_pairs_each_int8_model_with_the_float_model_it_was_quantized_from(int8_pair):
    """The folded conv's output is renamed (it holds a_k * ReLU(z), not ReLU(z)): only the folded float model has
    a tensor of that name, and the per-layer report picks the float model whose names the candidate carries."""
    plain, folded = int8_pair["plain"].read_bytes(), int8_pair["folded"].read_bytes()
    assert float_twin(int8_pair["float"], plain) == Twin(int8_pair["float"], False, False)
    found = float_twin(int8_pair["float"], folded)
    assert found.folded and not found.equalized and found.model == fold_scales(int8_pair["float"])[0]
    twin = found.model
    _, inputs = _grid_inputs(folded)
    assert "conv" not in {e.layer for e in layer_errors(int8_pair["float"], folded, inputs)}
    conv = next(e for e in layer_errors(twin, folded, inputs) if e.layer == "conv")
    assert conv.op == "CONV_2D" and conv.rmse <= _error_bound(folded)


def test_the_twin_of_a_graph_the_fold_cannot_read_is_the_plain_model(int8_pair, monkeypatch):
    """The int8 route converts such a graph unfolded (``routes._exact_rewrite``); the report pairs it likewise,
    with no error of the fold's reaching ``validate``."""
    def unreadable(model_bytes):
        raise IndexError("a graph the fold cannot read")

    monkeypatch.setattr(twin_module, "fold_scales", unreadable)
    assert float_twin(int8_pair["float"], int8_pair["folded"].read_bytes()) == Twin(int8_pair["float"], False, False)


def _two_block_model(path, padding: str):
    """Conv(relu) -> BN -> MaxPool -> Conv(relu, ``padding``) -> BN -> Flatten -> Dense, BN statistics spread."""
    import keras

    rng = np.random.default_rng(6)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(5, 2, activation="relu", padding=padding, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(4, name="dense")(x)
    model = keras.Model(inputs, x)
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        c = layer.get_weights()[0].shape[0]
        layer.set_weights([rng.uniform(1e-3, 5, c).astype("f"), rng.normal(0, 1, c).astype("f"),
                           rng.normal(0, 1, c).astype("f"), rng.uniform(0.5, 2, c).astype("f")])
    for name in ("conv1", "conv2", "dense"):
        layer = model.get_layer(name)
        layer.set_weights([rng.normal(0, 1, w.shape).astype("f") for w in layer.get_weights()])
    model.save(path)
    return _float_tflite(path)


def test_offsets_fold_into_the_next_valid_layer_through_a_max_pool(tmp_path):
    """max(y + d) = max(y) + d per channel, and a VALID conv or a dense layer of x + d is one of x plus a
    constant per output: every ADD goes into the next layer's bias."""
    before = _two_block_model(tmp_path / "valid.keras", "valid")
    assert _ops(before).count("ADD") == 2
    after, report = fold_scales(before)
    assert "ADD" not in _ops(after) and "MUL" not in _ops(after)
    assert [entry.to_dict() for entry in report.offsets] == [
        {"layer": "bn1", "into": "conv2", "op": "CONV_2D", "through_pool": True},
        {"layer": "bn2", "into": "dense", "op": "FULLY_CONNECTED", "through_pool": False}]
    _assert_same_function(before, after)


def test_an_offset_before_a_same_padded_conv_stays(tmp_path):
    """A SAME conv pads with zeros, which the offset does not shift: that ADD is not folded (the MULs are)."""
    before = _two_block_model(tmp_path / "same.keras", "same")
    after, report = fold_scales(before)
    assert [entry.into for entry in report.offsets] == ["dense"] and _ops(after).count("ADD") == 1
    assert "MUL" not in _ops(after)
    _assert_same_function(before, after)


def test_a_batchnorm_folded_away_is_kept_in_float_with_the_conv_it_went_into(tmp_path):
    """bn1 has no op of its own once its MUL and ADD are folded: naming it keeps conv1, which took its
    multipliers, in float (and the max pool whose output no longer carries its offset)."""
    _two_block_model(tmp_path / "valid.keras", "valid")
    settings = ConvertSettings("int8", input_convention="signed_unit", float_layers=("bn1",))
    conversion = convert_model(load_source(tmp_path / "valid.keras"), settings, _calibration(tmp_path))
    assert conversion.calibration.scale_fold["adds_removed"] == 2
    nodes = conversion.calibration.denylisted_nodes
    assert _float_ops(conversion.model) == ["CONV_2D"] and [n.split("/")[1] for n in nodes] == ["conv1_1", "pool1_1"]
    model = flatbuffers.read(conversion.model)
    graph = model.subgraphs[0]
    kept = next(op for op in graph.operators if flatbuffers.op_name(model, op) == "CONV_2D"
                and flatbuffers.type_names()[graph.tensors[op.inputs[1]].type] == "FLOAT32")
    assert "conv1" in graph.tensors[kept.outputs[0]].name.decode()


def _spread(model, seed: int):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if type(layer).__name__ == "BatchNormalization":
            c = weights[0].shape[0]
            layer.set_weights([rng.uniform(1e-3, 5, c).astype("f"), rng.normal(0, 1, c).astype("f"),
                               rng.normal(0, 1, c).astype("f"), rng.uniform(0.5, 2, c).astype("f")])
        elif weights:
            layer.set_weights([rng.normal(0, 1, w.shape).astype("f") for w in weights])
    return model


def test_depthwise_and_dense_producers_and_a_depthwise_reader_fold_exactly(tmp_path):
    """The other weight layouts: a depthwise conv's output channels are its weights' last axis (with a depth
    multiplier, channel k of the input feeds outputs k * m ... k * m + m - 1), a dense layer's are axis 0."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.DepthwiseConv2D(3, activation="relu", name="dw1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.DepthwiseConv2D(2, depth_multiplier=2, activation="relu", name="dw2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(7, activation="relu", name="dense1")(x)
    x = keras.layers.BatchNormalization(name="bn3")(x)  # the output: a dense layer after it would take it in
    _spread(keras.Model(inputs, x), 7).save(tmp_path / "layouts.keras")
    before = _float_tflite(tmp_path / "layouts.keras")
    after, report = fold_scales(before)
    assert [(e.layer, e.op, e.mul_removed) for e in report.layers] == [
        ("dw1", "DEPTHWISE_CONV_2D", True), ("dw2", "DEPTHWISE_CONV_2D", True), ("dense1", "FULLY_CONNECTED", True)]
    assert [(e.layer, e.into, e.op) for e in report.offsets] == [("bn1", "dw2", "DEPTHWISE_CONV_2D")]
    assert "MUL" not in _ops(after) and _ops(after).count("ADD") == 2  # bn2's, read by the mean; bn3's, the output
    _assert_same_function(before, after)
