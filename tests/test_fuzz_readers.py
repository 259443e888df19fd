"""Fuzzing every reader of untrusted bytes: each outcome is a result or the project's own typed error.

Small valid seeds are generated here (images in each decoded format, a
``.tflite`` built with the flatbuffer object API, with metadata and a packed
labels file, a manifest, ``.npy`` samples and device outputs, a ``.keras``
archive), then mutated by hypothesis: bytes overwritten, inserted, removed,
the file cut short. Any exception other than an ``XedgeError`` subclass
escaping a reader fails the test (a traceback for the user). The example
counts keep the whole file near a minute on two busy cores.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.core.errors import XedgeError
from tests.test_hostile_files import bigtiff_offset_overflow

def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


def typed(read, *args):
    """``read(*args)``, or None when it raised one of the project's errors; anything else propagates."""
    try:
        return read(*args)
    except XedgeError as exc:
        assert str(exc).strip()  # the CLI prints it as the one line
        return None


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """One seed with up to eight edits: overwrite, insert or delete a run of bytes, or cut the tail."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["set", "set", "set", "insert", "delete", "cut"]))
        run = draw(st.binary(min_size=1, max_size=8))
        if kind == "set":
            data[at:at + len(run)] = run
        elif kind == "insert":
            data[at:at] = run
        elif kind == "delete":
            del data[at:at + len(run)]
        else:
            del data[at:]
    return bytes(data)


# ---------------------------------------------------------------- seeds


def _image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    seeds = []
    for image, fmt, extra in [(rgb, "PNG", {}), (rgb, "JPEG", {"quality": 90}), (rgb, "BMP", {}),
                              (rgb.convert("P"), "GIF", {}), (rgb, "WEBP", {"lossless": True}),
                              (rgb, "TIFF", {}), (rgb.convert("RGBA"), "PNG", {}), (rgb.convert("L"), "TIFF", {}),
                              (rgb.convert("I;16"), "PNG", {})]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **extra)
        seeds.append(buffer.getvalue())
    return seeds + [bigtiff_offset_overflow()]


def _tflite_seeds() -> list[bytes]:
    """A one-op model (uint8 pixel input, and a float one) with the project's metadata and packed labels."""
    from pipeline.tflite import flatbuffers
    from pipeline.tflite.metadata import ModelInfo, add_metadata

    schema = flatbuffers.schema()
    seeds = []
    for pixel_input in (True, False):
        model = schema.ModelT()
        model.version = 3
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.RESHAPE
        code.version = 1
        model.operatorCodes = [code]
        model.buffers = [schema.BufferT()]
        tensors = []
        for name, shape in ((b"image", [1, 2, 2, 3]), (b"scores", [1, 12])):
            tensor = schema.TensorT()
            tensor.name, tensor.shape, tensor.buffer = name, np.array(shape, np.int32), 0
            tensor.type = schema.TensorType.UINT8 if pixel_input else schema.TensorType.FLOAT32
            if pixel_input:
                tensor.quantization = schema.QuantizationParametersT()
                tensor.quantization.scale, tensor.quantization.zeroPoint = [1.0], [0]
            tensors.append(tensor)
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, np.array([0], np.int32), np.array([1], np.int32)
        graph = schema.SubGraphT()
        graph.tensors, graph.operators = tensors, [op]
        graph.inputs, graph.outputs = np.array([0], np.int32), np.array([1], np.int32)
        model.subgraphs = [graph]
        info = ModelInfo("fuzz", "1", "a seed", labels=[f"c{i}" for i in range(12)],
                         mean=0.0 if pixel_input else 127.5, std=1.0 if pixel_input else 127.5)
        seeds.append(add_metadata(flatbuffers.write(model), info))
    return seeds


def _manifest_seed() -> bytes:
    from pipeline.core import artifacts
    from pipeline.core.preprocessing import PreprocessSpec

    manifest = artifacts.base_manifest("tflite")
    manifest.update({"settings": {"mode": "int8"}, "output": {"path": "m.tflite", "sha256": "0" * 64, "bytes": 9,
                                                            "replaces_sha256": None},
                     "preprocessing": PreprocessSpec(size=71, input_convention="pixels").describe(),
                     "input_convention": {"name": "pixels", "why": "default"}, "labels": ["a", "b"],
                     "io": {"inputs": [{"dtype": "uint8", "shape": [1, 71, 71, 3]}], "outputs": []}})
    return json.dumps(manifest).encode()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _keras_seed() -> bytes:
    layer = {"module": "keras.layers", "class_name": "Dense", "registered_name": None,
             "config": {"name": "d", "units": 3, "activation": "softmax", "kernel_initializer": {
                 "module": "keras.initializers", "class_name": "GlorotUniform", "config": {}}}}
    config = {"module": "keras", "class_name": "Sequential", "registered_name": None,
              "config": {"name": "s", "layers": [layer]}}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        zf.writestr("config.json", json.dumps(config))
    return buffer.getvalue()


IMAGES, TFLITES = _image_seeds(), _tflite_seeds()
MANIFEST, KERAS = _manifest_seed(), _keras_seed()
SAMPLES = [_npy(np.zeros((9, 7, 3), np.uint8)), _npy(np.zeros((1, 71, 71, 3), np.float32)),
           _npy(np.full((71, 71, 3), 0.5, np.float32))]
OUTPUTS = [_npy(np.zeros((4, 12), np.float32)), _npy(np.arange(48, dtype=np.uint8).reshape(4, 12))]


def test_the_seeds_are_valid(tmp_path):
    """Unmutated, each seed reads as a result: the fuzzing starts from files the readers accept."""
    from calibrate.dataset import _load_npy
    from pipeline.core.artifacts import read_manifest
    from pipeline.core.preprocessing import PreprocessSpec, decode_rgb
    from pipeline.tflite.input_convention import model_convention
    from pipeline.tflite.contents import inspect_tflite
    from pipeline.tflite.metadata import associated_files, read_metadata
    from pipeline.model.modelio import detect_kind

    assert all(decode_rgb(seed).shape[2] == 3 for seed in IMAGES[:-1])
    for seed in TFLITES:
        assert read_metadata(seed).name == b"fuzz" and "labels.txt" in associated_files(seed)
        assert inspect_tflite(seed).outputs[0]["shape"] == [1, 12]
    assert [model_convention(seed)[0] for seed in TFLITES] == ["pixels", "signed_unit"]
    (tmp_path / "m.manifest.json").write_bytes(MANIFEST)
    assert read_manifest(tmp_path / "m.manifest.json")["preprocessing"]["input_convention"] == "pixels"
    for k, seed in enumerate(SAMPLES):
        (tmp_path / f"{k}.npy").write_bytes(seed)
        assert _load_npy(tmp_path / f"{k}.npy", PreprocessSpec(size=71)).shape == (71, 71, 3)
    (tmp_path / "m.keras").write_bytes(KERAS)
    assert detect_kind(tmp_path / "m.keras") == "keras3"


@fuzz(400)
@given(mutated(IMAGES))
def test_image_decoding(data):
    from pipeline.core.preprocessing import decode_rgb, resize_rgb

    rgb = typed(decode_rgb, data, "fuzzed")
    if rgb is not None:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        assert resize_rgb(rgb, 8).shape == (8, 8, 3)


@fuzz(400)
@given(mutated(TFLITES))
def test_tflite_flatbuffer_and_metadata(data):
    from pipeline.tflite import flatbuffers
    from pipeline.tflite.input_convention import model_convention
    from pipeline.tflite.sandboxed_load import precheck
    from pipeline.tflite.contents import inspect_tflite
    from pipeline.tflite.metadata import associated_files, read_metadata

    typed(precheck, data)
    typed(flatbuffers.read, data)
    typed(read_metadata, data)
    assert isinstance(typed(associated_files, data) or {}, dict)
    convention = typed(model_convention, data)
    assert convention is None or convention[0] in ("pixels", "pixels_int8", "signed_unit")
    typed(inspect_tflite, data)


@fuzz(200)
@given(st.one_of(mutated([MANIFEST]),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                              lambda c: st.lists(c, max_size=3) | st.dictionaries(
                                  st.sampled_from(["tool", "schema", "output", "preprocessing", "input_convention",
                                                   "labels", "sha256", "size", "name", "x"]), c, max_size=4),
                              max_leaves=10).map(lambda v: json.dumps({"tool": "xception-edge", "schema": 1,
                                                                       "output": v, "preprocessing": v}).encode())))
def test_manifests(tmp_path_factory, data):
    from pipeline.core.artifacts import integrity, read_manifest
    from pipeline.tflite.input_convention import file_convention
    from pipeline.tflite.sandboxed_load import check_manifest

    folder = tmp_path_factory.mktemp("manifest", numbered=True)
    (folder / "m.manifest.json").write_bytes(data)
    model = folder / "m.tflite"
    model.write_bytes(TFLITES[0])
    typed(read_manifest, folder / "m.manifest.json")
    assert integrity(model, TFLITES[0]).state in ("unchecked", "ok", "unreadable", "unfinished", "mismatch")
    typed(check_manifest, model, TFLITES[0])
    typed(file_convention, model, TFLITES[0])


@fuzz(250)
@given(mutated(SAMPLES))
def test_npy_inputs(tmp_path_factory, data):
    from calibrate.dataset import _load_npy
    from pipeline.core.preprocessing import PreprocessSpec

    path = tmp_path_factory.mktemp("npy", numbered=True) / "x.npy"
    path.write_bytes(data)
    sample = typed(_load_npy, path, PreprocessSpec(size=71))
    if sample is not None:
        assert sample.shape == (71, 71, 3) and sample.size


@fuzz(200)
@given(mutated(OUTPUTS))
def test_device_runner_outputs(tmp_path_factory, data):
    from devices.parity_target import DeviceTarget
    from devices.profile import load_profile

    folder = tmp_path_factory.mktemp("outputs", numbered=True)
    (folder / "here.toml").write_text('transport = "local"\n')
    (folder / "o.npy").write_bytes(data)
    target = DeviceTarget(load_profile(str(folder / "here.toml")), folder / "m.tflite")
    rows = typed(target.read_outputs, folder / "o.npy", 4)
    assert rows is None or rows.shape[0] == 4


@fuzz(200)
@given(mutated([KERAS]))
def test_keras_archive_configuration(tmp_path_factory, data):
    from pipeline.model.keras_allowlist import disallowed_objects
    from pipeline.model.modelio import detect_kind

    path = tmp_path_factory.mktemp("keras", numbered=True) / "m.keras"
    path.write_bytes(data)
    kind = typed(detect_kind, path)
    assert kind in (None, "keras3", "tf_keras")
    try:
        config = json.loads(zipfile.ZipFile(path).read("config.json"))
    except Exception:  # noqa: BLE001 - only configurations that parse are walked below
        return
    assert isinstance(disallowed_objects(config), list)


@pytest.mark.parametrize("seed", range(3))
def test_allow_list_walk_takes_any_json(seed):
    from pipeline.model.keras_allowlist import disallowed_objects

    rng = np.random.default_rng(seed)

    def random_json(depth=0):
        pick = rng.integers(0, 6 if depth < 6 else 3)
        if pick == 0:
            return None
        if pick == 1:
            return rng.choice(["Dense", "function", "__keras_tensor__", "module", "relu", "keras.layers",
                               "keras.src.ops.nn", "builtins", "x"]).item()
        if pick == 2:
            return int(rng.integers(-5, 5))
        if pick == 3:
            return [random_json(depth + 1) for _ in range(rng.integers(0, 4))]
        keys = ["class_name", "module", "registered_name", "config", "activation", "kernel_initializer", "name"]
        return {str(rng.choice(keys)): random_json(depth + 1) for _ in range(rng.integers(0, 5))}

    for _ in range(300):
        assert isinstance(disallowed_objects(random_json()), list)
