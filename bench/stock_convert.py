"""The baseline: TensorFlow 2.21's TFLiteConverter as users call it by hand.

from_keras_model, a representative_dataset generator over the same images
(preprocessed by the same definition, so only the converter differs), full
int8 with int8 I/O. Run as a child process so its wall time and peak memory
are its own.
"""

import sys
import time

import numpy as np


def main(model_path: str, image_dir: str, out: str, count: int) -> None:
    import tensorflow as tf

    from pipeline.core.preprocessing import PreprocessSpec, preprocess_file
    from pipeline.model.modelio import load_source

    start = time.perf_counter()
    model = load_source(model_path).model  # a Keras 3 or a tf_keras model, as saved
    spec = PreprocessSpec(int(model.inputs[0].shape[1]))
    from pipeline.core.data import discover

    files = [item.path for item in discover(image_dir).items][:count]

    def representative():
        for f in files:
            yield [preprocess_file(f, spec)[None].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    data = converter.convert()
    with open(out, "wb") as f:
        f.write(data)
    print(f"{time.perf_counter() - start:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
