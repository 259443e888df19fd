"""The RELU-after-shared-ADD rewrite: one XNNPACK partition, same predictions, any such net."""

import json

import numpy as np
import pytest

from pipeline.core.artifacts import manifest_path_for
from pipeline.conversion.export import ConvertSettings, export_tflite
from pipeline.tflite.contents import inspect_tflite
from pipeline.tflite.rewrites import check_rewrite, delegate_partitions, fuse_shared_add_relu


@pytest.fixture(scope="module")
def stock_int8(trained_run, calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("stock") / "stock.tflite"
    # [-1, 1] input: the calibration set's own inputs and the Keras model's (the rewrite is what is tested here)
    old = ConvertSettings("int8", optimize=False, input_convention="signed_unit")
    return export_tflite(trained_run.model_path, old, out=out, representative=calibration)


def _quantized_tensors(model_bytes: bytes, indices, inputs) -> dict[int, np.ndarray]:
    """The raw integer values of the given tensors for each input (exposed as graph outputs)."""
    from pipeline.validation.layer_error import expose_tensors
    from pipeline.validation.predict import open_interpreter
    from pipeline.core.preprocessing import quantize

    interpreter = open_interpreter(expose_tensors(model_bytes, indices))
    inp = interpreter.get_input_details()[0]
    rows: dict[int, list] = {int(i): [] for i in indices}
    for x in inputs:
        interpreter.set_tensor(inp["index"], quantize(x[None], inp["dtype"], *inp["quantization"]))
        interpreter.invoke()
        for i in rows:
            rows[i].append(interpreter.get_tensor(i).astype(np.int64))
    return {i: np.stack(r) for i, r in rows.items()}


def _wiring(model_bytes: bytes) -> tuple[dict, dict, dict]:
    """From the flatbuffer: tensor index -> (scale, zero point), output tensor -> (op, inputs), name -> index."""
    from pipeline.tflite import flatbuffers
    model, names = flatbuffers.read(model_bytes), flatbuffers.op_names()
    graph = model.subgraphs[0]
    quant = {i: ((float(t.quantization.scale[0]), int(t.quantization.zeroPoint[0]))
                 if t.quantization is not None and t.quantization.scale is not None
                 and len(t.quantization.scale) == 1 else None) for i, t in enumerate(graph.tensors)}
    ops = {}
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = names[max(int(code.builtinCode), int(code.deprecatedBuiltinCode))]
        for o in op.outputs:
            ops[int(o)] = (name, [int(i) for i in op.inputs])
    by_name = {(t.name.decode() if isinstance(t.name, bytes) else t.name): i for i, t in enumerate(graph.tensors)}
    return quant, ops, by_name


def test_rewrite_leaves_one_partition_and_no_relu(stock_int8, calibration):
    before = stock_int8.model_bytes
    after, report = fuse_shared_add_relu(before)
    hist_before, hist_after = inspect_tflite(before).op_histogram, inspect_tflite(after).op_histogram
    relus = hist_before["RELU/int8"]
    assert report.count == relus >= 3  # one per block that opens with a ReLU over a residual sum
    assert "RELU/int8" not in hist_after
    assert hist_after["ADD/int8"] == hist_before["ADD/int8"] + relus
    assert delegate_partitions(before) == relus + 1
    assert delegate_partitions(after) == 1
    assert inspect_tflite(after).inputs == inspect_tflite(before).inputs

    # What holds for any trained model, op by op on real images, from the model's own scales: each fused
    # ADD computes relu(a + b) at the RELU's scale within one quantum (it rounds once); the stock ADD + RELU
    # within s_add / (2 s_out) + 1 quanta where its ADD did not saturate (it rounds twice).
    inputs = np.stack([calibration.inputs(i) for i in range(32)])
    quant, ops, by_name = _wiring(before)
    quant_after, ops_after, _ = _wiring(after)
    exposed = {}
    for entry in report.rewritten:
        out = by_name[entry["output"]]
        add = ops[out][1][0]
        assert ops[out][0] == "RELU" and ops[add] == ("ADD", entry["add_inputs"])  # stock: RELU(ADD(a, b))
        assert ops_after[out] == ("ADD", entry["add_inputs"])  # fused: ADD(a, b) with its ReLU, same output
        assert quant_after == quant  # every quantization kept, the RELU's output included
        exposed[out] = (add, *entry["add_inputs"])
    indices = [i for out, rest in exposed.items() for i in (out, *rest)]
    stock, fused = _quantized_tensors(before, indices, inputs), _quantized_tensors(after, indices, inputs)
    for out, (add, a, b) in exposed.items():
        (s_out, z_out), (s_add, _) = quant[out], quant[add]

        def ideal(values):  # relu(a + b) requantized once, from that model's own a and b
            x = (values[a] - quant[a][1]) * quant[a][0] + (values[b] - quant[b][1]) * quant[b][0]
            return np.clip(np.round(np.maximum(x, 0.0) / s_out) + z_out, -128, 127)

        assert np.abs(fused[out] - ideal(fused)).max() <= 1, entry["output"]
        inside = (stock[add] > -128) & (stock[add] < 127)
        assert inside.mean() > 0.9
        assert np.abs(stock[out] - ideal(stock))[inside].max() <= s_add / (2 * s_out) + 1, entry["output"]


def test_rewrite_check_accepts_a_changed_top1_only_when_no_further_from_float():
    """The rule the README states, exactly: mean absolute error against the float model no larger (no
    tolerance) and at least as many top-1 matches with it. Outputs are handed in through the check's cache;
    the values are dyadic, so the means are exact."""
    import hashlib

    reference = np.array([[0.875, 0.125], [0.125, 0.875], [0.5625, 0.4375], [0.4375, 0.5625]])
    stock = np.array([[0.875, 0.125], [0.125, 0.875], [0.75, 0.25], [0.75, 0.25]])  # 3 of 4 top-1 as float

    def check(rows: dict) -> dict:
        rewritten = stock.copy()
        for i, row in rows.items():
            rewritten[i] = row
        cache = {hashlib.sha256(name).hexdigest(): (out, out) for name, out in
                 ((b"stock", stock), (b"rewritten", rewritten))}
        return check_rewrite(b"stock", b"rewritten", np.zeros((4, 1)), reference, cache)

    same_top1 = check({2: [0.625, 0.375]})  # nearer to float, no top-1 moved: the float model is not asked
    assert same_top1["accepted"] and same_top1["top1_agreement"] == 1.0
    assert "stock_mean_abs_error_vs_float" not in same_top1
    equal = check({2: [0.25, 0.75], 3: [0.25, 0.75]})  # rows 2 and 3 trade places: equally far, as many matches
    assert equal["top1_agreement"] == 0.5 and equal["rewritten_top1_vs_float"] == equal["stock_top1_vs_float"]
    assert equal["rewritten_mean_abs_error_vs_float"] == equal["stock_mean_abs_error_vs_float"] == 0.125
    assert equal["accepted"]
    further = check({2: [0.25, 0.75], 3: [0.234375, 0.765625]})  # 3.1% further, as many matches: refused
    assert further["rewritten_mean_abs_error_vs_float"] == 0.125 * 1.03125 and not further["accepted"]
    fewer = check({2: [0.46875, 0.53125]})  # nearer to float, but one top-1 match fewer: refused
    assert fewer["rewritten_mean_abs_error_vs_float"] < 0.125 and not fewer["accepted"]


def test_convert_applies_and_records_it(trained_tflite, stock_int8):
    manifest = json.loads(manifest_path_for(trained_tflite["int8"]).read_text())
    (entry,) = manifest["optimizations"]
    assert entry["name"] == "fuse_shared_add_relu" and entry["applied"] is True
    assert entry["delegate_partitions"]["after"] == 1 < entry["delegate_partitions"]["before"]
    assert entry["check"]["samples"] == 32 and entry["check"]["top1_agreement"] == 1.0
    assert all("sepconv1_act" in r["output"] for r in entry["rewritten"])
    assert stock_int8.manifest["optimizations"] == []  # --no-optimize


def _preact_resnet(fused_tail: bool):
    """A small pre-activation residual net that is not Xception (ResNet v2 style)."""
    import keras
    from keras import layers

    x = inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(16, 3, padding="same")(x)
    for _ in range(3):
        y = layers.ReLU()(x)  # reads the previous sum, which is also the shortcut below
        y = layers.Conv2D(16, 3, padding="same")(y)
        y = layers.ReLU()(y)
        y = layers.Conv2D(16, 3, padding="same")(y)
        x = layers.Add()([x, y])
    if fused_tail:
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(5, activation="softmax")(x))


@pytest.mark.parametrize("fused_tail", [True])
def test_applies_to_other_preactivation_nets(tmp_path, fused_tail):
    import tensorflow as tf

    model = _preact_resnet(fused_tail)
    rng = np.random.default_rng(0)

    def rep():
        for _ in range(16):
            yield [rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = rep
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    stock = converter.convert()
    after, report = fuse_shared_add_relu(stock)
    # The next two blocks' ReLUs read residual sums: rewritten. The first block's ReLU reads the stem
    # conv's output (also the first shortcut), which this pass leaves alone (it would duplicate a conv),
    # and the tail ReLU reads a sum with no other consumer, which the converter fused by itself.
    assert report.count == 2
    assert delegate_partitions(stock) == 4 and delegate_partitions(after) == 2
    inputs = rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    assert check_rewrite(stock, after, inputs)["top1_agreement"] >= 0.75


def test_float_models_are_left_alone(trained_tflite):
    data = trained_tflite["float"].read_bytes()
    same, report = fuse_shared_add_relu(data)
    assert report.count == 0 and same is data


def test_xnnpack_report_names_what_splits_the_graph(stock_int8, trained_tflite):
    from pipeline.tflite.rewrites import xnnpack_report

    stock = xnnpack_report(stock_int8.model_bytes)
    assert stock["partitions"] > 1
    assert stock["outside"] and {e["op"] for e in stock["outside"]} == {"RELU"}
    assert all("no integer RELU" in e["reason"] and "sepconv1_act" in e["output"] for e in stock["outside"])
    assert stock_int8.manifest["xnnpack"] == stock
    ours = json.loads(manifest_path_for(trained_tflite["int8"]).read_text())["xnnpack"]
    # one partition; outside it only the uint8 -> int8 QUANTIZE of the pixel input, before it
    assert ours["partitions"] == 1 and [e["op"] for e in ours["outside"]] == ["QUANTIZE"]


def test_negligible_add_inputs_are_coarsened_so_xnnpack_takes_the_adds(calibration, tmp_path):
    """A freshly initialised deep Xception: residual branches ~1/2000 of the sum, which XNNPACK refuses."""
    import keras

    from pipeline.model.xception import build_xception
    from pipeline.tflite.rewrites import raise_negligible_add_inputs, xnnpack_report

    keras.utils.set_random_seed(0)
    build_xception(71, 10, 0.25, 8).save(tmp_path / "fresh.keras")
    old = ConvertSettings("int8", optimize=False, input_convention="signed_unit")  # [-1, 1], as the inputs below
    stock = export_tflite(tmp_path / "fresh.keras", old, out=tmp_path / "stock.tflite",
                          representative=calibration).model_bytes
    fused, _ = fuse_shared_add_relu(stock)
    before = xnnpack_report(fused)
    assert before["partitions"] > 1
    assert all(e["op"] == "ADD" and "scale ratio" in e["reason"] for e in before["outside"])
    after, report = raise_negligible_add_inputs(fused)
    assert report.count >= 1 and all(r["ratio_before"] < 1 / 1024 for r in report.rewritten)
    assert xnnpack_report(after) == {"partitions": 1, "outside": []}
    inputs = np.stack([calibration.inputs(i) for i in range(16)])
    check = check_rewrite(fused, after, inputs)
    assert check["top1_agreement"] == 1.0 and check["max_abs_quanta"] <= 1
    # and convert does both by default, recording each
    full = export_tflite(tmp_path / "fresh.keras", ConvertSettings("int8"), out=tmp_path / "ours.tflite",
                         representative=calibration)
    assert [e["name"] for e in full.manifest["optimizations"]] == ["fuse_shared_add_relu",
                                                                   "raise_negligible_add_inputs"]
    assert all(e["applied"] for e in full.manifest["optimizations"])
    assert full.manifest["xnnpack"]["partitions"] == 1


def _scramble_classifier(model_bytes):
    """A harmful 'rewrite': the classifier's weight rows reversed, so classes swap."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    from pipeline.tflite.rewrites import RewriteReport

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    graph = model.subgraphs[0]
    report = RewriteReport("scramble_classifier")
    for op in graph.operators:
        if model.operatorCodes[op.opcodeIndex].builtinCode == schema.BuiltinOperator.FULLY_CONNECTED:
            weights = graph.tensors[op.inputs[1]]
            data = np.frombuffer(bytes(model.buffers[weights.buffer].data), np.int8).reshape(weights.shape)
            model.buffers[weights.buffer].data = np.ascontiguousarray(data[::-1]).view(np.uint8).ravel()
            report.rewritten.append({"op": "FULLY_CONNECTED"})
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), report


def test_a_harmful_rewrite_is_dropped_and_the_good_one_kept(stock_int8, trained_run, calibration):
    """The rewrites are checked together first; when that fails, each is checked alone."""
    from pipeline.conversion.export import optimize_graph
    from pipeline.model.modelio import load_source

    source = load_source(trained_run.model_path)
    out, entries = optimize_graph(stock_int8.model_bytes, source, calibration,
                                  rewrites=(_scramble_classifier, fuse_shared_add_relu))
    by_name = {e["name"]: e for e in entries}
    assert by_name["scramble_classifier"]["applied"] is False
    assert by_name["scramble_classifier"]["check"]["top1_agreement"] < 0.5
    assert by_name["fuse_shared_add_relu"]["applied"] is True
    assert out == fuse_shared_add_relu(stock_int8.model_bytes)[0]


def test_rewrites_that_pass_together_are_checked_once(stock_int8, trained_tflite):
    manifest = json.loads(manifest_path_for(trained_tflite["int8"]).read_text())
    names = [e["name"] for e in manifest["optimizations"]]
    assert names and all(e["check"]["together_with"] == names for e in manifest["optimizations"])
