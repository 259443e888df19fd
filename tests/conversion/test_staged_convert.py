"""int8 in stages: the converter's own bytes, stages reused, float .tflite sources, shared stderr capture."""

import contextlib
import json
import os
import shutil
import threading

import numpy as np
import pytest

from pipeline.conversion import converter_hooks

from pipeline.tflite import flatbuffers
from pipeline.conversion import routes as export_module
from pipeline.core.errors import CalibrationError
from pipeline.conversion.export import ConvertSettings, convert_bytes, convert_model, export_tflite
from pipeline.conversion.convention_choice import converted_source
from pipeline.model.modelio import load_source
from pipeline.core.tf_logs import native_stderr_captured
from tests.conftest import invoke_cli, run_cli


def _tree(model):
    """Every field of a flatbuffer object tree (ops with their options and versions, tensors, buffers,
    subgraph inputs and outputs, signatures, metadata, description) as plain comparable values."""
    if isinstance(model, np.ndarray):
        return ("array", str(model.dtype), model.shape, model.tobytes())
    if isinstance(model, (list, tuple)):
        return [_tree(v) for v in model]
    if model is None or isinstance(model, (bool, int, float, str, bytes, np.generic)):
        return model
    return {"class": type(model).__name__, **{k: _tree(v) for k, v in sorted(vars(model).items())}}


def _without_conversion_metadata(model):
    """Drop the CONVERSION_METADATA entry and its buffer (the last one, used by nothing else)."""
    entry = [m for m in model.metadata if m.name == b"CONVERSION_METADATA"]
    assert len(entry) == 1 and entry[0].buffer == len(model.buffers) - 1
    used = [t.buffer for g in model.subgraphs for t in g.tensors] + [m.buffer for m in model.metadata]
    assert used.count(entry[0].buffer) == 1
    model.metadata = [m for m in model.metadata if m is not entry[0]]
    model.buffers = model.buffers[:-1]
    return model


def converter_hooks_class_freeze():
    from tensorflow.lite.python import lite

    return lite.TFLiteFrozenGraphConverterV2.__dict__["_freeze_concrete_function"]


def test_freezing_without_the_reimport_gives_the_same_float_model(trained_run, monkeypatch):
    used = []
    real = converter_hooks.fast_freeze

    stock_method = converter_hooks_class_freeze()

    @contextlib.contextmanager
    def watched(converter):
        with real(converter) as active:
            used.append(active)
            assert converter_hooks_class_freeze() is stock_method  # set on the converter, not on the class
            yield active

    monkeypatch.setattr(export_module, "fast_freeze", watched)
    fast = convert_bytes(load_source(trained_run.model_path), ConvertSettings("float"))
    assert used == [True], "the freeze hook did not run: re-check pipeline/converter_hooks.fast_freeze"
    monkeypatch.setattr(export_module, "fast_freeze", lambda converter: contextlib.nullcontext(False))
    stock = convert_bytes(load_source(trained_run.model_path), ConvertSettings("float"))
    assert fast == stock


def test_staged_int8_is_the_converters_own_model(trained_run, calibration, monkeypatch):
    """Every field equal, op options included; only the converter's CONVERSION_METADATA entry is absent."""
    # pixel input is also pinned between the stages; the converter in one call has no bias correction
    old = ConvertSettings("int8", input_convention="signed_unit", bias_correction=False)
    conversion = convert_model(load_source(trained_run.model_path), old, calibration)
    staged, record = conversion.model, conversion.calibration
    assert conversion.route == "staged" and record.stages and record.calibrator == "fast-minmax"
    monkeypatch.setattr(export_module, "_use_stages", lambda *a: False)
    once = convert_bytes(load_source(trained_run.model_path), old, calibration)
    ours, theirs = flatbuffers.read(staged), flatbuffers.read(once)
    assert b"CONVERSION_METADATA" not in [m.name for m in ours.metadata]
    theirs = _without_conversion_metadata(theirs)
    assert _tree(ours) == _tree(theirs)
    assert flatbuffers.write(ours) == flatbuffers.write(theirs)
    # The comparison sees op options: one changed option (a conv's stride) is a difference.
    conv = next(op for op in ours.subgraphs[0].operators if op.builtinOptions is not None
                and hasattr(op.builtinOptions, "strideW"))
    conv.builtinOptions.strideW += 1
    assert _tree(ours) != _tree(theirs)


def test_float_layer_choices_reuse_the_float_model_and_calibration(trained_run, calibration, monkeypatch):
    from pipeline.conversion.float_fallback import op_outputs_by_layer

    calls = {"convert": 0, "calibrate": 0}
    real_make, real_minmax = export_module._make_converter, converter_hooks.fast_minmax

    def make(source):
        calls["convert"] += 1
        return real_make(source)

    def minmax(*args, **kwargs):
        calls["calibrate"] += 1
        return real_minmax(*args, **kwargs)

    monkeypatch.setattr(export_module, "_make_converter", make)
    monkeypatch.setattr(converter_hooks, "fast_minmax", minmax)
    source = load_source(trained_run.model_path)
    quantized = convert_bytes(source, ConvertSettings("int8"), calibration)
    layer = next(iter(op_outputs_by_layer(converted_source(source, "pixels").cache.calibrated.model)))
    partial = convert_model(source, ConvertSettings("int8", float_layers=(layer,)), calibration)
    assert calls == {"convert": 1, "calibrate": 1}
    assert partial.calibration.float_layers == [layer] and partial.model != quantized


def test_a_float_tflite_quantizes_to_the_same_bytes_as_its_keras_model(trained_run, trained_tflite, digits,
                                                                         tmp_path):
    """The .tflite source in a real process, which never imports TensorFlow (so the quantizer's extension runs);
    the Keras model and the two refusals in-process (CliRunner), where TensorFlow is loaded already."""
    float_copy = tmp_path / "float.tflite"
    shutil.copy(trained_tflite["float"], float_copy)
    shutil.copy(trained_tflite["float"].with_name("float.manifest.json"), tmp_path / "float.manifest.json")
    common = ["--int8", "--calib", digits["samples"], "--calib-size", "64", "--json"]
    run_cli("convert", float_copy, *common, "--out", tmp_path / "from_tflite.tflite", check=True)
    invoke_cli("convert", trained_run.model_path, *common, "--out", tmp_path / "from_keras.tflite", check=True)
    assert (tmp_path / "from_tflite.tflite").read_bytes() == (tmp_path / "from_keras.tflite").read_bytes()
    manifest = json.loads((tmp_path / "from_tflite.manifest.json").read_text())
    method = manifest["calibration"]["method"]
    assert manifest["source"]["kind"] == "tflite" and method["calibrator"] == "fast-minmax"
    # quantized without TensorFlow's Python package, and still the same bytes as the TensorFlow route
    assert method["quantizer_route"] == "extension"
    assert json.loads((tmp_path / "from_keras.manifest.json").read_text())["calibration"]["method"][
        "quantizer_route"] == "tensorflow"
    assert manifest["labels"] == json.loads((tmp_path / "from_keras.manifest.json").read_text())["labels"]

    again = invoke_cli("convert", tmp_path / "from_tflite.tflite", *common, "--out", tmp_path / "twice.tflite")
    assert again.returncode == 2 and "is already quantized" in again.stderr and "Traceback" not in again.stderr
    fp16 = invoke_cli("convert", float_copy, "--fp16", "--out", tmp_path / "h.tflite")
    assert fp16.returncode == 2 and "int8 only" in fp16.stderr and "Traceback" not in fp16.stderr
    assert not (tmp_path / "twice.tflite").exists() and not (tmp_path / "h.tflite").exists()


NO_TENSORFLOW_SCRIPT = """
import sys
from click.testing import CliRunner
import convert
result = CliRunner().invoke(convert.convert_command, sys.argv[1:])
print(result.exit_code, "tensorflow" in sys.modules, "keras" in sys.modules)
"""


def test_a_float_tflite_is_quantized_without_ever_importing_tensorflow(trained_tflite, digits, tmp_path):
    """The README's claim for `convert X.tflite --int8`: calibration on LiteRT and the quantizer's extension
    module alone; TensorFlow's Python package is never imported, at any point of the command."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    args = [str(trained_tflite["float"]), "--int8", "--calib", str(digits["samples"]), "--calib-size", "16",
            "--out", str(tmp_path / "q.tflite")]
    proc = subprocess.run([sys.executable, "-c", NO_TENSORFLOW_SCRIPT, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout.split()[-3:] == ["0", "False", "False"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "q.tflite").exists()


def test_a_float_tflite_made_for_other_preprocessing_is_refused(trained_tflite, calibration, tmp_path):
    model = tmp_path / "float.tflite"
    shutil.copy(trained_tflite["float"], model)
    manifest = json.loads(trained_tflite["float"].with_name("float.manifest.json").read_text())
    manifest["preprocessing"]["fingerprint"] = "0" * 16
    (tmp_path / "float.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CalibrationError, match="preprocessing"):
        export_tflite(model, ConvertSettings("int8"), out=tmp_path / "q.tflite", representative=calibration)
    assert not (tmp_path / "q.tflite").exists()


def test_interleaved_stderr_captures_leave_fd2_as_it_was():
    """A enters, B enters, A leaves, B leaves (TensorFlow loading on one thread, calibration on another)."""
    before = os.fstat(2)
    a_in, a_out, b_in = threading.Event(), threading.Event(), threading.Event()
    texts = {}

    def a():
        with native_stderr_captured() as cap:
            os.write(2, b"from-a\n")
            a_in.set()
            b_in.wait(5)
        texts["a"] = cap.text
        a_out.set()

    thread = threading.Thread(target=a)
    thread.start()
    a_in.wait(5)
    with native_stderr_captured() as cap_b:
        b_in.set()
        a_out.wait(5)
        os.write(2, b"from-b\n")
    thread.join(5)
    after = os.fstat(2)
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
    assert "from-a" in texts["a"] and "from-b" in cap_b.text and "from-a" not in cap_b.text


def test_a_broken_tflite_source_is_refused_in_one_line(trained_tflite, digits, tmp_path):
    broken = tmp_path / "broken.tflite"
    data = bytearray(trained_tflite["float"].read_bytes())
    data[4:8] = b"XXXX"  # the flatbuffer identifier (TFL3)
    broken.write_bytes(bytes(data))
    proc = run_cli("convert", broken, "--int8", "--calib", digits["samples"], "--out", tmp_path / "q.tflite")
    assert proc.returncode == 2 and proc.stderr.startswith("error: invalid model") and "Traceback" not in proc.stderr
    assert not (tmp_path / "q.tflite").exists()


def test_the_extension_route_speaks_the_quantizers_own_constants(trained_run, calibration):
    """The enum values handed to the extension, and the copied deduplication, against TensorFlow's own."""
    import tensorflow as tf
    from tensorflow.compiler.mlir.lite import types_pb2
    from tensorflow.lite.python import convert

    assert convert.convert_tensor_tf_type_to_tflite_type(tf.int8) == converter_hooks.IO_INT8
    assert convert.convert_tensor_tf_type_to_tflite_type(tf.float32) == converter_hooks.IO_FLOAT
    assert types_pb2.QUANTIZED_INT8 == converter_hooks.QUANTIZED_INT8
    source = load_source(trained_run.model_path)
    convert_bytes(source, ConvertSettings("int8", input_convention="signed_unit"), calibration)
    quantized = convert.mlir_quantize(source.cache.calibrated.model, input_data_type=tf.int8,
                                      output_data_type=tf.int8)
    ours = converter_hooks._deduplicate_readonly_buffers(quantized)
    theirs = convert.deduplicate_readonly_buffers(quantized)
    assert _tree(flatbuffers.read(ours)) == _tree(flatbuffers.read(bytes(theirs)))
    assert converter_hooks._converter_api_path() is not None


def test_a_failed_conversion_leaves_no_sandbox_probe_behind(trained_tflite, tmp_path):
    """The probe of a .tflite source runs while the command goes on; an error first must still clean it up."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = run_cli("convert", trained_tflite["float"], "--int8", "--calib", tmp_path / "no_such_folder",
                   "--out", tmp_path / "q.tflite", env={"TMPDIR": str(tmp)})
    assert proc.returncode == 2 and "calibration folder not found" in proc.stderr
    assert list(tmp.iterdir()) == []


def test_convert_leaves_no_temporary_files(trained_run, digits, tmp_path):
    """The convert script skips Python's teardown (os._exit) but still runs the exit handlers that clean up,
    such as TensorFlow's autograph sources."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = run_cli("convert", trained_run.model_path, "--int8", "--calib", digits["samples"], "--calib-size", 16,
                   "--out", tmp_path / "q.tflite", env={"TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp.iterdir()) == []
