"""Model files crafted to run code or crash the tool, and the legitimate models the same checks must let through.

Every hostile file is generated here; nothing binary is committed.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ModelLoadError
from tests.conftest import invoke_cli, run_cli


def _initializer_writes(sm: Path, marker: Path) -> Path:
    """A SavedModel whose resource initializer writes ``marker``: it runs as soon as TensorFlow loads the model."""
    import tensorflow as tf

    class Planted(tf.saved_model.experimental.TrackableResource):
        def _create_resource(self):
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="planted")

        def _initialize(self):
            tf.io.write_file(str(marker), "pwned")
            tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=1.0)

    class Module(tf.Module):
        def __init__(self):
            self.resource = Planted()

        @tf.function(input_signature=[tf.TensorSpec([None, 71, 71, 3], tf.float32)])
        def serve(self, x):
            return tf.reduce_mean(x, axis=[1, 2])

    module = Module()
    tf.saved_model.save(module, str(sm), signatures={"serving_default": module.serve})
    return sm


def _keras_archive(path: Path, config: dict, keras_version: str = "2.21.0") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": keras_version, "date_saved": "2026-01-01"}))
        zf.writestr("config.json", json.dumps(config))
    return path


def _reloaded_layer(sm: Path, name: str = "reloaded") -> dict:
    return {"module": "tf_keras.src.export.export_lib", "class_name": "ReloadedLayer", "registered_name": None,
            "config": {"filepath": str(sm), "call_endpoint": "serve", "name": name, "trainable": True}}


def test_reloaded_layer_keras_file_is_refused_and_its_savedmodel_never_runs(tmp_path):
    marker = tmp_path / "written-by-the-model"
    sm = _initializer_writes(tmp_path / "sm", marker)
    marker.unlink(missing_ok=True)
    top = _keras_archive(tmp_path / "top.keras", _reloaded_layer(sm))
    nested = _keras_archive(tmp_path / "nested.keras", {
        "module": "keras", "class_name": "Sequential", "registered_name": None,
        "config": {"name": "seq", "layers": [
            {"module": "keras.layers", "class_name": "InputLayer", "registered_name": None,
             "config": {"batch_input_shape": [None, 71, 71, 3], "name": "in"}},
            _reloaded_layer(sm, "inner")]}})
    for path, run in ((top, run_cli), (nested, invoke_cli)):  # the nested one in-process (CliRunner): its message
        proc = run("convert", path, "--float", "--out", tmp_path / "x.tflite", cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "ReloadedLayer" in lines[0] and "tf_keras.src.export.export_lib" in lines[0]
        assert "refused" in lines[0] and "--trust-model-code" in lines[0]
        assert not marker.exists() and not (tmp_path / "x.tflite").exists()


def test_a_module_named_in_a_config_is_never_imported(tmp_path, monkeypatch):
    """tf_keras imports whatever module a config names; a planted module on the path must never be imported."""
    from pipeline.model.modelio import load_source

    marker = tmp_path / "imported"
    (tmp_path / "planted_layers.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _keras_archive(tmp_path / "planted.keras", {"module": "planted_layers", "class_name": "Evil",
                                                        "registered_name": None, "config": {"name": "e"}})
    with pytest.raises(ModelLoadError, match="Evil layer 'e' from planted_layers.*refused"):
        load_source(path)
    custom = _keras_archive(tmp_path / "custom.keras", {"module": "keras.layers", "class_name": "Dense",
                                                         "registered_name": "MyPackage>Dense", "config": {}})
    with pytest.raises(ModelLoadError, match="MyPackage>Dense"):
        load_source(custom)
    assert not marker.exists()


def test_allow_list_refuses_code_carrying_objects_anywhere():
    from pipeline.model.keras_allowlist import disallowed_objects

    layer = {"module": "keras.layers", "class_name": "Dense", "registered_name": None, "config": {"name": "d"}}
    assert disallowed_objects(layer) == []
    for bad, expected in [
        ({"module": "keras.layers", "class_name": "Lambda", "config": {"name": "l"}}, "Lambda layer 'l'"),
        ({"module": "keras.layers", "class_name": "TFSMLayer", "config": {"name": "t"}}, "TFSMLayer layer 't'"),
        ({"class_name": "TFOpLambda", "config": {"name": "op", "function": "io.write_file"}}, "TFOpLambda"),
        ({"module": "keras.layers", "class_name": "StringLookup", "config": {"name": "s"}}, "StringLookup"),
        ({"class_name": "__lambda__", "config": {"code": "x"}}, "__lambda__"),
        ({"module": "keras.src.ops.core", "class_name": "Cond", "config": {}}, "Cond"),
        ({"module": "os", "class_name": "system", "config": "true"}, "from os"),
        ({"module": "builtins", "class_name": "function", "config": "exec"}, "function 'exec'"),
        ({"module": "builtins", "class_name": "function", "config": {"a": 1}}, "function"),
        ({"module": "keras.layers", "class_name": "Dense", "config": {"activation": "exec"}}, "activation 'exec'"),
        ({"module": "keras.layers", "class_name": "Dense", "config": {"kernel_initializer": "os.system"}},
         "kernel_initializer"),
    ]:
        model = {"module": "keras", "class_name": "Functional", "registered_name": "Functional",
                 "config": {"layers": [layer, {"wrapped": [bad]}]}}
        found = disallowed_objects(model)
        assert len(found) == 1 and expected in found[0], (bad, found)
    # The loaders drop the top level's compile_config unread (compile=False); a nested one is checked.
    compiled = {**layer, "compile_config": {"loss": {"module": "evil", "class_name": "Loss"}}}
    assert disallowed_objects(compiled) == []
    assert disallowed_objects({**layer, "config": {"inner": compiled}}) == ["'Loss' from evil"]


def test_allow_list_names_are_keras_classes():
    import inspect

    import keras
    import tf_keras

    from pipeline.model import keras_allowlist as allow

    def classes(*modules):
        return {n for m in modules for n, v in vars(m).items() if inspect.isclass(v)}

    layers = classes(keras.layers, tf_keras.layers)
    assert allow.LAYERS <= layers, allow.LAYERS - layers
    assert not {"Lambda", "TFSMLayer", "JaxLayer", "FlaxLayer", "TorchModuleWrapper", "StringLookup",
                "IntegerLookup", "TextVectorization", "Layer", "Wrapper"} & allow.LAYERS
    capitalized = {n for n in allow.INITIALIZERS | allow.REGULARIZERS | allow.CONSTRAINTS if n[0].isupper()}
    known = classes(keras.initializers, keras.regularizers, keras.constraints, tf_keras.initializers)
    assert capitalized <= known, capitalized - known
    assert allow.ACTIVATIONS <= set(vars(keras.activations)), allow.ACTIVATIONS - set(vars(keras.activations))
    assert allow.DTYPE_POLICIES - {"Policy"} <= classes(keras.dtype_policies)
    for module, names in allow.APPLICATION_LAYERS.items():
        assert names <= classes(__import__(module, fromlist=["_"])), module
    assert {"Add", "Multiply", "Softmax", "Resize"} <= set().union(*map(allow.operations, allow.OP_MODULES))
    import importlib.util

    assert all(importlib.util.find_spec(m) for m in allow.QUANTIZATION_MODULES)
    assert "Cond" not in allow.CORE_OPS and "Map" not in allow.CORE_OPS


@pytest.fixture(scope="module")
def users_models(tmp_path_factory) -> dict[str, Path]:
    """Models users bring: Keras applications built with weights=None, a nested transfer-learning model with
    augmentation and rescaling, a functional graph with keras.ops calls, tf_keras .h5 and .keras files."""
    import keras
    import tf_keras

    out = tmp_path_factory.mktemp("users")
    paths = {}
    for name, build in [("mobilenet_v2", keras.applications.MobileNetV2),
                        ("efficientnet_b0", keras.applications.EfficientNetB0),
                        ("convnext_tiny", keras.applications.ConvNeXtTiny)]:
        build(weights=None, input_shape=(64, 64, 3), classes=5).save(paths.setdefault(name, out / f"{name}.keras"))
    base = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), include_top=False)
    inputs = keras.Input((64, 64, 3))
    x = keras.layers.RandomFlip()(inputs)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(x)
    x = keras.layers.Normalization(mean=[0.0, 0.0, 0.0], variance=[1.0, 1.0, 1.0])(x)
    x = keras.layers.GlobalAveragePooling2D()(base(x, training=False))
    x = keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(1e-4),
                           kernel_constraint=keras.constraints.MaxNorm(3))(keras.layers.Dropout(0.2)(x))
    keras.Model(inputs, keras.ops.softmax(x * 2.0)).save(paths.setdefault("transfer", out / "transfer.keras"))
    small = tf_keras.Sequential([tf_keras.layers.InputLayer((32, 32, 3)), tf_keras.layers.Conv2D(4, 3),
                                 tf_keras.layers.BatchNormalization(), tf_keras.layers.GlobalAveragePooling2D(),
                                 tf_keras.layers.Dense(3, "softmax")])
    small.save(paths.setdefault("tf_keras_h5", out / "small.h5"))
    small.save(paths.setdefault("tf_keras_keras", out / "small.keras"))
    tf_keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=5).save(
        paths.setdefault("tf_keras_mobilenet_h5", out / "mobilenet.h5"))
    from pipeline.model.tfmot_import import import_tfmot

    qat = import_tfmot().quantization.keras.quantize_model(tf_keras.Model(small.inputs, small.outputs))
    qat.save(paths.setdefault("qat_h5", out / "qat.h5"))  # what ``xedge qat`` writes: tfmot's wrappers
    return paths


def test_users_legitimate_models_pass_the_allow_list(users_models, tiny_keras_path):
    from pipeline.model.keras_allowlist import disallowed_objects
    from pipeline.model.modelio import load_source

    for name, path in {**users_models, "project_xception": tiny_keras_path}.items():
        if path.suffix == ".keras":
            config = json.loads(zipfile.ZipFile(path).read("config.json"))
        else:
            import h5py

            with h5py.File(path) as f:
                config = json.loads(f.attrs["model_config"])
        assert disallowed_objects(config) == [], name
    for name in ("transfer", "efficientnet_b0", "tf_keras_h5", "tf_keras_keras", "qat_h5"):
        source = load_source(users_models[name])
        assert source.classes in (3, 5)
        assert np.isfinite(np.asarray(source.model(np.zeros((1, *source.input_shape), np.float32)))).all()


# ---------------------------------------------------------------- MediaPipe's native metadata parser


def _metadata_past_the_buffers(source: Path, out: Path) -> Path:
    """``source`` with its TFLITE_METADATA entry naming a buffer past the end of the buffer list."""
    from pipeline.tflite import flatbuffers

    model = flatbuffers.read(source.read_bytes())
    for entry in model.metadata:
        if entry.name in (b"TFLITE_METADATA", "TFLITE_METADATA"):
            entry.buffer = len(model.buffers) + 7
    out.write_bytes(flatbuffers.write(model))
    return out


def test_metadata_past_the_buffer_list_is_one_error_before_mediapipe_reads_it(trained_tflite, digits, tmp_path):
    from pipeline.tflite.metadata import read_metadata

    crafted = _metadata_past_the_buffers(trained_tflite["float"], tmp_path / "crafted.tflite")
    with pytest.raises(ModelLoadError, match="names buffer .* but the model has"):
        read_metadata(crafted.read_bytes())
    for _ in range(2):  # the parent never crashes, run after run
        proc = run_cli("xedge", "parity", crafted, "--eval", digits["val"], "--mediapipe", "--limit", 3,
                       cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "metadata" in lines[0], proc.stderr


def test_mediapipe_runs_in_a_child_whose_crash_is_one_error(trained_tflite, monkeypatch, tmp_path):
    """With the schema check off, MediaPipe's own parser gets the crafted file: whatever it does (crash, refuse,
    run), this process gets a result or a ValidationError."""
    import importlib.util

    from pipeline.core.errors import ValidationError
    from pipeline.validation import mediapipe_client
    from pipeline.validation.parity import LitertReference

    if importlib.util.find_spec("mediapipe") is None:
        from tests.conftest import missing

        missing("needs mediapipe (the dev extra installs it)")
    crafted = _metadata_past_the_buffers(trained_tflite["float"], tmp_path / "crafted.tflite")
    io = LitertReference(trained_tflite["float"]).io
    monkeypatch.setattr(mediapipe_client, "read_metadata", lambda data: None)
    outcomes = []
    for _ in range(3):
        try:
            target = mediapipe_client.MediapipeTarget(crafted, io)
            target.close()
            outcomes.append("opened")
        except ValidationError as exc:
            assert "\n" not in str(exc)
            outcomes.append(str(exc).split(":")[0])
    assert len(outcomes) == 3
    target = mediapipe_client.MediapipeTarget(trained_tflite["float"], io)  # a sound model still opens
    assert target._process.is_alive()
    target.close()
    assert not target._process.is_alive()
