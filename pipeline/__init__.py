"""The xception-edge library, one package per stage of the pipeline.

Stages, from the bottom up; a module imports only from its own stage and the
stages listed before it (``tests/test_architecture.py`` enforces this):

    core         shared plumbing: errors, manifests and atomic writes, the one
                 preprocessing definition, image folders, the digits data,
                 quiet TensorFlow logs
    tflite       the .tflite file itself, without TensorFlow: flatbuffer access,
                 what a model holds, its metadata and input convention, the
                 sandboxed loader, the interpreter with its XNNPACK fallback,
                 graph rewrites, splicing
    model        the Keras model and its training: the Xception builder, the
                 tf_keras twin, loading users' models, pretrained weights, the
                 training loop, quantization-aware training, folding the input
                 scaling into the stem
    conversion   Keras/SavedModel -> .tflite: settings, the input convention a
                 model gets, the staged converter and TensorFlow's private
                 converter API, float fallback, export
    validation   running models and judging them: runners, drift metrics,
                 per-layer error, accuracy budgets, reports, diff, sweep,
                 parity with other runtimes (a device, MediaPipe)

``demo`` runs them all on the digits and so sits on top. Outside ``pipeline/``,
``calibrate/`` and ``devices/`` may import any stage; ``convert.py`` (the CLI)
imports everything; ``devices/runner.py`` imports nothing from the project,
since it is copied to devices on its own.
"""
