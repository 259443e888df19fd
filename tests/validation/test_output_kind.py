"""What a model's output is (probabilities or logits), read from the model: Keras config, SavedModel graph, .tflite ops.

One small model per final activation, in each format a runner opens; an
int8 model with float output has a DEQUANTIZE after its SOFTMAX.
"""

from __future__ import annotations

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
