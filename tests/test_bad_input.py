"""Bad input, faults and untrusted files: every case ends in a clear error or a listed skip.

Each case below is one row of the README's "Bad input" section. Nothing here
may end in a traceback, a crash, a hang, a half-written file, or code run
from a model file.
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from calibrate.dataset import build_calibration_set
from pipeline.core.artifacts import manifest_path_for, read_manifest
from pipeline.core.errors import Remedy
from pipeline.core.errors import ArtifactError, CalibrationError, ModelLoadError
from pipeline.core.faults import PAUSE_ENV
from pipeline.core.preprocessing import ImageError, PreprocessSpec, decode_rgb, pixels_for
from pipeline.tflite.sandboxed_load import load_untrusted, probe
from tests.conftest import VENV_BIN, invoke_cli, missing, run_cli

SPEC = PreprocessSpec(32)


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(im, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _bomb_png(side: int = 30000) -> bytes:
    """A PNG header that claims side x side pixels: tiny on disk, gigabytes if decoded."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(im, exif=exif.tobytes())


def _corpus(root: Path) -> dict[str, str]:
    """Write every kind of image file users point us at; return name -> expected outcome."""
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    files = {
        "ok.png": (_png(good), "ok"),
        "zero.jpg": (b"", "empty file"),
        "truncated.jpg": (_jpeg(good)[:300], "corrupt or truncated"),
        "truncated.png": (_png(good)[:200], "corrupt or truncated"),
        "text.jpg": (b"this is not a picture\n" * 10, "not a recognised image format"),
        "notes.txt": (b"stray notes", "not an image"),
        "data.csv": (b"a,b\n1,2\n", "not an image"),
        "bomb.png": (_bomb_png(), "too large"),
        "cmyk.jpg": (_jpeg(Image.new("CMYK", (30, 30), (0, 255, 255, 0))), "ok"),
        "gray16.png": (_png(Image.fromarray(np.full((30, 30), 40000, np.uint16))), "ok"),
        "rgba.png": (_png(Image.new("RGBA", (30, 30), (20, 200, 20, 128))), "ok"),
        "gray.png": (_png(Image.new("L", (30, 30), 90)), "ok"),
        "rotated.jpg": (_exif_rotated(), "ok"),
    }
    palette = Image.new("P", (30, 30), 1)
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)
    files["palette.png"] = (buf.getvalue(), "ok")
    frames = [Image.new("RGB", (30, 30), c) for c in ((250, 0, 0), (0, 250, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    files["animated.gif"] = (buf.getvalue(), "ok")
    expected = {}
    for name, (data, outcome) in files.items():
        (root / name).write_bytes(data)
        expected[name] = outcome
    os.symlink(root / "loop_b.png", root / "loop_a.png")
    os.symlink(root / "loop_a.png", root / "loop_b.png")
    os.symlink(root / "gone.png", root / "dangling.png")
    expected.update({"loop_a.png": "symlink", "loop_b.png": "symlink", "dangling.png": "symlink"})
    return expected


def test_image_corpus_each_file_is_used_or_skipped_with_its_reason(tmp_path):
    root = tmp_path / "dossier à trier" / "chats et chiens"
    root.mkdir(parents=True)
    expected = _corpus(root)
    cal = build_calibration_set(tmp_path / "dossier à trier", SPEC, size=100)
    used = {Path(f["path"]).name for f in cal.files}
    skipped = {Path(s.path).name: s.reason for s in cal.skipped}
    for name, outcome in expected.items():
        if outcome == "ok":
            assert name in used, (name, skipped.get(name))
        else:
            assert name in skipped and outcome in skipped[name], (name, skipped.get(name))
    assert "possible decompression bomb" in skipped["bomb.png"]  # refused from its header (ours or Pillow's)
    assert {f["label"] for f in cal.files} == {"chats et chiens"}  # non-ASCII, spaces
    # converted, never clamped: 16-bit 40000 -> 156, not 255
    gray16 = cal.samples[[Path(f["path"]).name for f in cal.files].index("gray16.png")]
    assert int(gray16[0, 0, 0]) == round(40000 / 257)


def test_pillow_bomb_warning_becomes_a_skip(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 40x40 image now trips Pillow's own warning
    (tmp_path / "a.png").write_bytes(_png(Image.new("RGB", (40, 40), 5)))
    (tmp_path / "b.png").write_bytes(_png(Image.new("RGB", (10, 10), 5)))
    cal = build_calibration_set(tmp_path, SPEC, size=10)
    assert [Path(f["path"]).name for f in cal.files] == ["b.png"]
    assert "decompression bomb" in cal.skipped[0].reason


def test_exif_rotation_is_the_same_everywhere(tmp_path, copy_of):
    from pipeline.model.train import load_labeled

    (tmp_path / "c" / "x").mkdir(parents=True)
    (tmp_path / "c" / "x" / "r.jpg").write_bytes(_exif_rotated())
    calib = build_calibration_set(tmp_path / "c", SPEC, size=1).samples[0]
    direct = pixels_for(tmp_path / "c" / "x" / "r.jpg", SPEC)
    training = load_labeled(tmp_path / "c", SPEC)[0][0]
    assert np.array_equal(calib, direct) and np.array_equal(direct, training)
    assert direct[2, 16, 0] > 200 and direct[28, 16, 2] > 200  # red on top: the rotation was applied


def test_a_folder_of_only_bad_files_is_one_clear_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"<html>")
    os.symlink(tmp_path / "nowhere", tmp_path / "c.png")
    proc = invoke_cli("xedge", "convert", tmp_path / "m.keras", "--int8", "--calib", tmp_path, cwd=tmp_path)
    assert proc.returncode == 2
    # The model is missing too: the first problem found is reported, in one line, without a traceback.
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    with pytest.raises(CalibrationError, match="all 3 files were skipped"):
        build_calibration_set(tmp_path, SPEC)


# A real Encapsulated PostScript page: Pillow's EPS plugin renders it by running Ghostscript (``gs``).
_EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
        b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def test_postscript_named_jpg_is_a_skip_and_ghostscript_never_runs(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\n")  # any call leaves a trace
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches where it found gs
    images = tmp_path / "images"
    images.mkdir()
    (images / "page.jpg").write_bytes(_EPS)
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), 7).save(buf, format="PPM")  # a valid image, but not a format the README lists
    (images / "netpbm.png").write_bytes(buf.getvalue())
    (images / "ok.png").write_bytes(_png(Image.new("RGB", (20, 20), 9)))
    cal = build_calibration_set(images, SPEC, size=10)
    assert [Path(f["path"]).name for f in cal.files] == ["ok.png"]
    skipped = {Path(s.path).name: s.reason for s in cal.skipped}
    assert set(skipped) == {"page.jpg", "netpbm.png"}
    for reason in skipped.values():
        assert "not a recognised image format" in reason and "JPEG, PNG, BMP, GIF, WebP, TIFF" in reason
    with pytest.raises(ImageError, match="not a recognised image format"):
        decode_rgb(_EPS, "page.jpg")
    assert not marker.exists(), marker.read_text()


# ---------------------------------------------------------------- model files


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_keras_path):
    from pipeline.conversion.export import ConvertSettings, export_tflite

    return export_tflite(tiny_keras_path, ConvertSettings("float"), out=tmp_path_factory.mktemp("m") / "float.tflite")


@pytest.fixture(scope="module")
def small_tflite(converted):
    return converted.model_bytes


def _broken_models(good: bytes) -> dict[str, bytes]:
    rng = random.Random(7)
    flipped = bytearray(good)
    for _ in range(200):
        flipped[rng.randrange(16, len(flipped))] ^= 1 << rng.randrange(8)
    return {"empty": b"", "header only": good[:8], "truncated": good[: len(good) // 3],
            "text": b"model = load('weights')\n" * 20, "bit-flipped": bytes(flipped),
            "root offset past end": struct.pack("<I", len(good) * 4) + good[4:]}


def test_broken_tflite_files_are_invalid_models(small_tflite, converted, tmp_path):
    import shutil

    for name, data in _broken_models(small_tflite).items():
        path = tmp_path / f"{name}.tflite"
        path.write_bytes(data)
        # The manifest travels with the model: flips in the weights load fine but break the recorded sha256.
        shutil.copy(converted.manifest_path, manifest_path_for(path))
        with pytest.raises(ModelLoadError, match="^invalid model: ") as caught:
            load_untrusted(path, timeout=60)
        if name == "bit-flipped":
            assert "does not match the sha256" in str(caught.value)
    assert probe(small_tflite)["inputs"][0]["shape"] == [1, 71, 71, 3]


def test_mutation_loop_never_crashes_or_hangs_the_parent(small_tflite):
    """Bounded fuzzing: random byte mutations of a valid model, each loaded in the sandboxed child."""
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "invalid": 0}
    for case in range(16):
        data = bytearray(small_tflite)
        for _ in range(rng.choice((1, 8, 64, 512))):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if case % 4 == 3:
            data = data[: rng.randrange(8, len(data))]
        try:
            probe(bytes(data), f"mutant {case}", timeout=60)
            outcomes["loaded"] += 1
        except ModelLoadError as exc:
            assert str(exc).startswith("invalid model: ")
            outcomes["invalid"] += 1
    # Mutations that only touch weights still load (correctly so); structural ones must be errors.
    assert sum(outcomes.values()) == 16 and outcomes["invalid"] >= 4


def test_a_loader_that_hangs_is_stopped(small_tflite, tmp_path, monkeypatch):
    import pipeline.tflite.sandboxed_load as safe

    monkeypatch.setattr(safe, "_CHILD", "import time\ntime.sleep(60)\n")
    with pytest.raises(ModelLoadError, match="did not finish in 2 s"):  # only the timeout says so: it was stopped
        probe(small_tflite, timeout=2)


# Replaces the probe's body (after the limits it sets first): reports what the child sees.
_CHILD_REPORT = r"""
import json, os, resource, sys
try:
    bytearray(1024 * 2**20)
    big = "allocated"
except MemoryError:
    big = "MemoryError"
print(json.dumps({"isolated": sys.flags.isolated, "path": sys.path, "env": sorted(os.environ), "big": big,
                  "as": resource.getrlimit(resource.RLIMIT_AS), "cpu": resource.getrlimit(resource.RLIMIT_CPU),
                  "core": resource.getrlimit(resource.RLIMIT_CORE), "own_session": os.getsid(0) == os.getpid()}))
"""


def test_probe_child_is_isolated_and_sets_its_own_limits(small_tflite, tmp_path, monkeypatch):
    import pipeline.tflite.sandboxed_load as safe

    planted, marker = tmp_path / "planted", tmp_path / "planted-ran"
    planted.mkdir()
    (planted / "numpy.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('planted')\n")
    monkeypatch.setenv("PYTHONPATH", str(planted))
    monkeypatch.setenv("XEDGE_TEST_SECRET", "not for the child")
    monkeypatch.chdir(planted)  # nor is the working directory importable
    assert probe(small_tflite, timeout=60)["inputs"][0]["shape"] == [1, 71, 71, 3]  # the real child, unharmed
    assert not marker.exists()
    monkeypatch.setattr(safe, "_CHILD", _CHILD_REPORT)
    seen = probe(small_tflite, timeout=30, memory_mb=512)
    assert seen["isolated"] == 1 and not any(str(planted) in p or p in ("", ".") for p in seen["path"])
    assert set(seen["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TF_CPP_MIN_LOG_LEVEL"}
    assert seen["as"] == [512 * 2**20] * 2 and seen["big"] == "MemoryError"  # the limit is in effect
    assert seen["cpu"] == [35, 40] and seen["core"] == [0, 0] and seen["own_session"]


# ---------------------------------------------------------------- Keras files with code


def _marker_lambda(marker: Path):
    path = str(marker)  # a plain string: Keras serializes the lambda's closure with it
    return lambda x: (open(path, "a").close(), x)[1]


def test_keras3_lambda_is_refused_and_never_runs(tmp_path):
    import keras

    from pipeline.model.modelio import load_source

    marker = tmp_path / "code-ran"
    x = inputs = keras.Input((71, 71, 3))
    x = keras.layers.Lambda(_marker_lambda(marker), name="sneaky")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    model.save(tmp_path / "lambda.keras")
    marker.unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="Lambda layer 'sneaky'.*refused") as refused:
        load_source(tmp_path / "lambda.keras")
    assert refused.value.remedy == Remedy.TRUST_CODE
    assert not marker.exists()
    proc = invoke_cli("convert", tmp_path / "lambda.keras", "--float", cwd=tmp_path)  # loads here too, as above
    assert proc.returncode == 2 and "refused" in proc.stderr and not marker.exists()
    assert not (tmp_path / "lambda_float.tflite").exists()
    trusted = load_source(tmp_path / "lambda.keras", trust_code=True)  # the explicit opt-in
    trusted.model(np.zeros((1, 71, 71, 3), np.float32))
    assert marker.exists()


def test_tf_keras_h5_lambda_is_refused_before_tf_keras_sees_it(tmp_path):
    import tf_keras

    from pipeline.model.modelio import load_source

    marker = tmp_path / "code-ran"
    model = tf_keras.Sequential([tf_keras.layers.InputLayer((71, 71, 3)),
                                 tf_keras.layers.Lambda(_marker_lambda(marker), name="sneaky"),
                                 tf_keras.layers.GlobalAveragePooling2D(), tf_keras.layers.Dense(3)])
    model.save(tmp_path / "lambda.h5")
    marker.unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="refused"):
        load_source(tmp_path / "lambda.h5")
    assert not marker.exists()  # tf_keras ignores safe_mode for .h5; our own check stopped it


def _saved_model(path: Path, side_effect=None) -> Path:
    """A small classifier SavedModel (71x71x3 -> 10); ``side_effect(x)`` runs inside its serving signature."""
    import tensorflow as tf

    class Classifier(tf.Module):
        def __init__(self):
            self.w = tf.Variable(tf.ones((3, 10)))

        @tf.function(input_signature=[tf.TensorSpec([None, 71, 71, 3], tf.float32)])
        def __call__(self, x):
            if side_effect is not None:
                side_effect(self)
            return {"output_0": tf.nn.softmax(tf.reduce_mean(x, axis=[1, 2]) @ self.w)}

    model = Classifier()
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.__call__})
    return path


def test_saved_model_ops_outside_the_safe_list_are_refused_and_never_run(tmp_path):
    import tensorflow as tf

    from pipeline.model.modelio import load_source
    from pipeline.model.saved_model_ops import unsafe_saved_model_ops
    from pipeline.validation.predict import open_runner

    marker = tmp_path / "written-by-the-model"
    sm = _saved_model(tmp_path / "sm", lambda m: tf.io.write_file(str(marker), "pwned"))
    # The saver's own SaveV2 is accepted in its save function, but not in the serving signature.
    saver_op = _saved_model(tmp_path / "save_v2", lambda m: tf.raw_ops.SaveV2(
        prefix=str(tmp_path / "ckpt"), tensor_names=["w"], shape_and_slices=[""], tensors=[m.w]))
    assert list(unsafe_saved_model_ops(sm)) == ["WriteFile"]
    assert list(unsafe_saved_model_ops(saver_op)) == ["SaveV2"]
    for path, op in ((sm, "WriteFile"), (saver_op, "SaveV2")):
        with pytest.raises(ModelLoadError, match=f"{op} \\(in .*refused before loading") as refused:
            load_source(path)
        assert refused.value.remedy == Remedy.TRUST_CODE
    # in-process (CliRunner), as load_source above: a model that ran would have written the marker all the same
    proc = invoke_cli("convert", sm, "--float", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "WriteFile" in lines[0] and "--trust-model-code" in lines[0]
    proc = invoke_cli("xedge", "sweep", sm, "--calib", tmp_path, "--eval", tmp_path, "--out", tmp_path / "sweep",
                      cwd=tmp_path)
    assert proc.returncode == 2 and "WriteFile" in proc.stderr and "--trust-model-code" in proc.stderr
    assert not marker.exists() and not (tmp_path / "ckpt.index").exists()
    assert not list(tmp_path.glob("*.tflite")) and not (tmp_path / "sweep").exists()
    runner = open_runner(sm, trust_code=True)  # the explicit opt-in: the model's graph runs, file write included
    assert runner.predict(np.zeros((1, 71, 71, 3), np.float32)).shape == (1, 10)
    assert marker.read_text() == "pwned"


def test_normal_saved_models_pass_the_safe_list(tiny_keras_path, tmp_path):
    import keras
    import tf_keras
    from tensorflow.core.protobuf import saved_model_pb2

    from pipeline.model.modelio import load_source
    from pipeline.model.saved_model_ops import unsafe_saved_model_ops

    keras.saving.load_model(tiny_keras_path).export(str(tmp_path / "xception"), verbose=False)
    small = tf_keras.Sequential([tf_keras.layers.InputLayer((71, 71, 3)), tf_keras.layers.Conv2D(4, 3),
                                 tf_keras.layers.BatchNormalization(), tf_keras.layers.ReLU(),
                                 tf_keras.layers.GlobalAveragePooling2D(), tf_keras.layers.Dense(3, "softmax")])
    small.save(tmp_path / "tf_keras")
    for path in (tmp_path / "xception", tmp_path / "tf_keras", _saved_model(tmp_path / "module")):
        assert unsafe_saved_model_ops(path) == {}, path
        proto = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
        ops = {n.op for g in proto.meta_graphs for f in g.graph_def.library.function for n in f.node_def}
        assert {"SaveV2", "RestoreV2"} <= ops  # the saver's functions are there, and were told apart
    assert load_source(tmp_path / "xception").classes == 10


def test_safe_op_list_is_registered_ops_and_names_each_stateful_one():
    from tensorflow.python.framework import op_def_registry

    from pipeline.model.saved_model_ops import SAFE_TF_OPS

    defs = {op: op_def_registry.get(op) for op in SAFE_TF_OPS}
    assert not [op for op, d in defs.items() if d is None]
    # Stateful ops on the list, each reviewed: variables of the model itself, calls and control flow (bodies
    # checked), asserts, random numbers. ReadFile, for one, is *not* stateful: statefulness is no safety test.
    assert {op for op, d in defs.items() if d.is_stateful} == {
        "CheckNumerics", "CheckNumericsV2", "Assert", "VarHandleOp", "ReadVariableOp", "AssignVariableOp",
        "AssignAddVariableOp", "AssignSubVariableOp", "VarIsInitializedOp", "VariableV2", "Variable",
        "StatefulPartitionedCall", "If", "While", "Case", "RandomUniform", "RandomStandardNormal", "TruncatedNormal",
        "RandomUniformInt"}
    assert not {"ReadFile", "WriteFile", "PyFunc", "EagerPyFunc", "PrintV2", "MatchingFiles", "SaveV2",
                "RestoreV2"} & SAFE_TF_OPS


def test_keras3_tfsmlayer_is_refused_by_us_and_by_keras_safe_mode(tmp_path, monkeypatch):
    import keras
    import tensorflow as tf

    import pipeline.model.modelio as modelio

    marker = tmp_path / "written-by-the-model"
    sm = _saved_model(tmp_path / "sm", lambda m: tf.io.write_file(str(marker), "pwned"))
    inputs = keras.Input((71, 71, 3))
    outside = keras.layers.TFSMLayer(str(sm), call_endpoint="serving_default", name="outside")
    model = keras.Model(inputs, outside(inputs))
    model.save(tmp_path / "wrapper.keras")
    marker.unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="TFSMLayer layer 'outside'.*refused") as refused:
        modelio.load_source(tmp_path / "wrapper.keras")
    assert refused.value.remedy == Remedy.TRUST_CODE
    monkeypatch.setattr(modelio, "disallowed_objects", lambda config: [])  # without our check: safe_mode alone
    with pytest.raises(ModelLoadError, match="TFSMLayer"):
        modelio.load_source(tmp_path / "wrapper.keras")
    assert not marker.exists()


def test_no_pickle_anywhere():
    root = Path(__file__).resolve().parents[1]
    sources = [p for d in ("pipeline", "calibrate", "devices") for p in (root / d).rglob("*.py")]
    sources.append(root / "convert.py")
    for path in sources:
        text = path.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, path


# ---------------------------------------------------------------- faults while writing


def _convert_args(trained_run, digits, out, calib_size: int = 600):
    return [str(VENV_BIN / "convert"), str(trained_run.model_path), "--int8", "--calib", str(digits["train"]),
            "--calib-size", str(calib_size), "--out", str(out), "--force"]


def _paused(marker: Path, proc: subprocess.Popen) -> bool:
    """Wait until ``proc`` stops at the pause hook of pipeline.core.artifacts.atomic_write_pair (True), or ends
    without reaching it (False)."""
    while not marker.exists():
        try:
            proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            continue
        return marker.exists()
    return True


def _signalled_at_the_pause(args: list[str], marker: Path, sig: int) -> tuple[int, str]:
    """Run convert ``args`` until the pause hook holds it between the manifest's rename and the model's, send
    ``sig`` there: the exit code and stderr."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, PAUSE_ENV: f"pair-between:{marker}"})
    try:
        assert _paused(marker, proc), proc.communicate(timeout=60)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.slow
def test_interrupted_convert_leaves_the_old_model_and_no_staged_file(trained_run, digits, tmp_path):
    """SIGINT at the last moment an interrupt can land, held there by the pause hook (the manifest renamed,
    the new model staged, not yet renamed): exit 130 with one message, the old bytes in place."""
    out = tmp_path / "m.tflite"
    old = b"previous model bytes"
    out.write_bytes(old)
    args = _convert_args(trained_run, digits, out, calib_size=20)
    code, err = _signalled_at_the_pause(args, tmp_path / "paused", signal.SIGINT)
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert out.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_file_size_limit_is_a_clear_error(trained_run, digits, tmp_path):
    out = tmp_path / "m.tflite"
    out.write_bytes(b"previous")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    args = _convert_args(trained_run, digits, out)
    args[args.index("600")] = "20"
    proc = subprocess.run(args, preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "file size limit was reached; nothing was changed" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == b"previous" and not manifest_path_for(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]


def test_read_only_output_folder_is_a_clear_error(tiny_keras_path, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True,
                                 text=True)
    except FileNotFoundError:
        missing("needs mount(8) to mount a read-only tmpfs (make system-deps installs it)")
    if mounted.returncode:
        missing(f"cannot mount a read-only tmpfs here (needs root): {mounted.stderr.strip()[-200:]}")
    try:
        proc = run_cli("convert", tiny_keras_path, "--float", "--out", ro / "m.tflite")
        assert proc.returncode == 2 and "read-only" in proc.stderr and "Traceback" not in proc.stderr
        from pipeline.core.artifacts import atomic_write_bytes

        with pytest.raises(ArtifactError, match="read-only"):
            atomic_write_bytes(ro / "x.bin", b"data")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


# ---------------------------------------------------------------- fuzzing the manifest reader


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                              max_leaves=12).map(lambda v: json.dumps(v).encode()),
                 st.fixed_dictionaries({"tool": st.sampled_from(["xception-edge", "other"]),
                                        "schema": st.integers(-3, 5)}).map(lambda v: json.dumps(v).encode())))
def test_manifest_reader_never_crashes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("m", numbered=True) / "x.manifest.json"
    path.write_bytes(data)
    try:
        result = read_manifest(path)
    except ArtifactError as exc:
        assert str(path) in str(exc)
    else:
        assert result["tool"] == "xception-edge" and result["schema"] <= 1


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_decoder_never_crashes_on_arbitrary_bytes(data):
    from pipeline.core.preprocessing import ImageError

    try:
        out = decode_rgb(data)
    except ImageError as exc:
        assert exc.reason
    else:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


def test_bench_and_validate_report_invalid_models(small_tflite, converted, digits, tmp_path):
    """Both commands that load .tflite files from users go through the sandboxed loader. The first broken file
    in real processes (the user's stderr); the others differ only in the bytes the sandbox reads, and run
    in-process (CliRunner), without a TensorFlow start-up each."""
    for index, (name, data) in enumerate(_broken_models(small_tflite).items()):
        bad = tmp_path / "bad.tflite"
        bad.write_bytes(data)
        manifest_path_for(bad).unlink(missing_ok=True)
        if name == "bit-flipped":
            import shutil

            shutil.copy(converted.manifest_path, manifest_path_for(bad))
        for args in (["xedge", "bench", bad, "--runs", "2"],
                     ["xedge", "validate", converted.path, bad, "--data", digits["val"], "--report",
                      tmp_path / "r", "--limit", "10"]):
            proc = (invoke_cli if index else run_cli)(*args, cwd=tmp_path)
            assert proc.returncode == 2, (name, args[1], proc.stderr)
            assert proc.stderr.startswith("error: invalid model: ") and "Traceback" not in proc.stderr, proc.stderr
