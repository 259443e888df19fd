"""What a model's output is (probabilities or logits), read from the model: Keras config, SavedModel graph, .tflite ops.

One small model per final activation, in each format a runner opens; an
int8 model with float output has a DEQUANTIZE after its SOFTMAX.
"""

from __future__ import annotations

import json
import re

import pytest

from pipeline.validation.predict import KerasRunner, TfliteRunner

# final activation -> (probabilities?, Keras evidence, SavedModel evidence, .tflite op)
CASES = {
    "softmax": (True, "the output layer 'predictions' has a softmax activation",
                "a Softmax op produces the serving output", "SOFTMAX op produces the output"),
    "sigmoid": (True, "the output layer 'predictions' has a sigmoid activation",
                "a Sigmoid op produces the serving output", "LOGISTIC op produces the output"),
    None: (False, "the output layer 'predictions' has activation 'linear', not softmax or sigmoid",
           "the serving output comes from a BiasAdd op, not Softmax or Sigmoid",
           "the output comes from FULLY_CONNECTED, not from a SOFTMAX or LOGISTIC op"),
}


@pytest.mark.parametrize("activation", list(CASES), ids=str)
def test_output_kind_in_every_format(tmp_path, calibration, activation):
    import keras

    from pipeline.conversion.export import ConvertSettings, export_tflite

    inputs = keras.Input((71, 71, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(5, activation=activation, name="predictions")(x))
    model.save(tmp_path / "m.keras")
    model.export(str(tmp_path / "saved"), verbose=False)
    probabilities, keras_says, graph_says, op_says = CASES[activation]

    for path, says in [(tmp_path / "m.keras", keras_says), (tmp_path / "saved", graph_says)]:
        kind = KerasRunner(path).output_kind
        assert (kind.probabilities, kind.evidence) == (probabilities, says), path
    float_tflite = export_tflite(tmp_path / "m.keras", ConvertSettings("float"), out=tmp_path / "f.tflite").path
    checks = [(float_tflite, op_says)]
    if activation == "softmax":  # an int8 model with float output: SOFTMAX, then DEQUANTIZE
        int8 = export_tflite(tmp_path / "m.keras", ConvertSettings("int8", float_io=True), out=tmp_path / "q.tflite",
                             representative=calibration).path
        checks.append((int8, op_says + " (through DEQUANTIZE)"))
    for path, says in checks:
        runner = TfliteRunner(path, workers=1)
        try:
            assert (runner.output_kind.probabilities, runner.output_kind.evidence) == (probabilities, says), path
        finally:
            runner.close()


def _head_model(head):
    import keras

    inputs = keras.Input((71, 71, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, head(keras.layers.Dense(10, name="logits")(x)))


def _ops_softmax(x):
    import keras

    return keras.ops.softmax(x)


def _softmax_reshaped(x):
    import keras

    x = keras.layers.Activation("softmax", name="probs")(x)
    return keras.layers.Flatten(name="flat")(keras.layers.Reshape((1, 10), name="reshape")(x))


def _softmax_then_linear(x):
    import keras

    x = keras.layers.Softmax(name="probs")(x)
    x = keras.layers.Activation("linear", name="linear")(x)
    return keras.layers.Dropout(0.5, name="drop")(keras.layers.Identity(name="same")(x))


def _logits_reshaped(x):
    import keras

    return keras.layers.Reshape((10,), name="reshape")(keras.layers.Activation("linear", name="linear")(x))


# head -> (probabilities?, Keras evidence as a pattern: Keras numbers a second operation named softmax softmax_1)
HEADS = {
    "ops.softmax": (_ops_softmax, True, r"the output layer 'softmax(_\d+)?' has a softmax activation"),
    "softmax, reshape, flatten": (_softmax_reshaped, True, r"the layer 'probs' has a softmax activation "
                                  r"\(through Reshape 'reshape', Flatten 'flat'\)"),
    "softmax, linear, identity, dropout": (_softmax_then_linear, True, r"the layer 'probs' has a softmax activation "
                                           r"\(through Activation 'linear', Identity 'same', Dropout 'drop'\)"),
    "logits, linear, reshape": (_logits_reshaped, False, r"the layer 'logits' has activation 'linear' \(through "
                                r"Activation 'linear', Reshape 'reshape'\), not softmax or sigmoid"),
}


@pytest.mark.parametrize("head", list(HEADS))
def test_output_kind_looks_past_shape_only_layers_on_both_sides(tmp_path, calibration, head):
    """The Keras model and its int8 .tflite (float output: ..., DEQUANTIZE, RESHAPE) are called the same."""
    from pipeline.conversion.export import ConvertSettings, export_tflite

    build, probabilities, keras_says = HEADS[head]
    _head_model(build).save(tmp_path / "m.keras")
    kind = KerasRunner(tmp_path / "m.keras").output_kind
    assert kind.probabilities == probabilities and re.fullmatch(keras_says, kind.evidence), kind.evidence
    int8 = export_tflite(tmp_path / "m.keras", ConvertSettings("int8", float_io=True), out=tmp_path / "q.tflite",
                         representative=calibration).path
    runner = TfliteRunner(int8, workers=1)
    try:
        assert runner.output_kind.probabilities == probabilities, runner.output_kind.evidence
    finally:
        runner.close()


def test_tf_keras_op_layers_are_read_the_same_way():
    """tf_keras turns tf.nn.softmax on a symbolic tensor into a TFOpLambda layer, and writes its config another way."""
    import tensorflow as tf
    import tf_keras

    from pipeline.model.keras_output import keras_output_kind

    inputs = tf_keras.Input((4,))
    x = tf.nn.softmax(tf_keras.layers.Dense(3, name="logits")(inputs))
    model = tf_keras.Model(inputs, tf_keras.layers.Reshape((3,), name="reshape")(x))
    kind = keras_output_kind(model)
    assert (kind.probabilities, kind.evidence) == (True, "the layer 'tf.nn.softmax' has a softmax activation "
                                                         "(through Reshape 'reshape')")
    linear = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(4,), name="logits"),
                                  tf_keras.layers.Flatten(name="flat")])
    assert keras_output_kind(linear).probabilities is False


def test_validate_takes_a_model_whose_output_is_keras_ops_softmax(tmp_path, digits):
    """Both commands in-process (CliRunner): what is checked is the report they write."""
    from tests.conftest import invoke_cli

    _head_model(_ops_softmax).save(tmp_path / "m.keras")
    float_tflite = tmp_path / "m_float.tflite"
    invoke_cli("convert", tmp_path / "m.keras", "--float", "--out", float_tflite, check=True)
    proc = invoke_cli("xedge", "validate", tmp_path / "m.keras", float_tflite, "--data", digits["val"], "--limit",
                      "20", "--layer-samples", "0", "--report", tmp_path / "report")
    assert proc.returncode == 0, proc.stderr
    outputs = json.loads((tmp_path / "report" / "report.json").read_text())["outputs"]
    assert re.fullmatch(r"probabilities \(the output layer 'softmax(_\d+)?' has a softmax activation\)",
                        outputs["reference"]), outputs
    assert outputs["candidate"] == "probabilities (SOFTMAX op produces the output)"
