"""int8 in stages: the converter's own bytes, stages reused, float .tflite sources, shared stderr capture."""

import contextlib
import json
import os
import shutil
import threading

import numpy as np
import pytest

from pipeline import converter_hooks
from pipeline import export as export_module
from pipeline.errors import CalibrationError
from pipeline.export import ConvertSettings, convert_bytes, export_tflite
from pipeline.modelio import load_source
from pipeline.quiet import native_stderr_captured
from tests.conftest import run_cli


def _structure(model_bytes: bytes):
    """Everything that computes: ops and their wiring, tensors with types, shapes, quantization and data."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    graph = model.subgraphs[0]

    def q(t):
        p = t.quantization
        if p is None:
            return None
        return tuple(None if v is None else tuple(np.ravel(v).tolist()) for v in (p.scale, p.zeroPoint, p.min, p.max))

    ops = [(model.operatorCodes[o.opcodeIndex].builtinCode, tuple(o.inputs), tuple(o.outputs))
           for o in graph.operators]
    tensors = [(t.name, t.type, tuple(t.shape), q(t),
                bytes(model.buffers[t.buffer].data) if model.buffers[t.buffer].data is not None else b"")
               for t in graph.tensors]
    metadata = sorted(m.name.decode() if isinstance(m.name, bytes) else m.name for m in model.metadata or [])
    return ops, tensors, metadata


def test_freezing_without_the_reimport_gives_the_same_float_model(trained_run, monkeypatch):
    used = []
    real = converter_hooks.fast_freeze

    @contextlib.contextmanager
    def watched():
        with real() as active:
            used.append(active)
            yield active

    monkeypatch.setattr(converter_hooks, "fast_freeze", watched)
    fast = convert_bytes(load_source(trained_run.model_path), ConvertSettings("float"))
    assert used == [True], "the freeze hook did not run: re-check pipeline/converter_hooks.fast_freeze"
    monkeypatch.setattr(converter_hooks, "fast_freeze", lambda: contextlib.nullcontext(False))
    stock = convert_bytes(load_source(trained_run.model_path), ConvertSettings("float"))
    assert fast == stock


def test_staged_int8_is_the_converters_own_model(trained_run, calibration, monkeypatch):
    record: dict = {}
    old = ConvertSettings("int8", input_convention="signed_unit")  # pixel input is also pinned between the stages
    staged = convert_bytes(load_source(trained_run.model_path), old, calibration, calibration_record=record)
    assert "stages" in record and record["calibrator"] == "fast-minmax"
    monkeypatch.setattr(export_module, "_use_stages", lambda *a: False)
    once = convert_bytes(load_source(trained_run.model_path), old, calibration)
    a_ops, a_tensors, a_meta = _structure(staged)
    b_ops, b_tensors, b_meta = _structure(once)
    assert a_ops == b_ops and a_tensors == b_tensors
    assert "CONVERSION_METADATA" in b_meta and "CONVERSION_METADATA" not in a_meta


def test_float_layer_choices_reuse_the_float_model_and_calibration(trained_run, calibration, monkeypatch):
    from pipeline.float_fallback import op_outputs_by_layer

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
    layer = next(iter(op_outputs_by_layer(export_module.converted_source(source, "pixels").cache["calibrated"][2])))
    record: dict = {}
    partial = convert_bytes(source, ConvertSettings("int8", float_layers=(layer,)), calibration,
                            calibration_record=record)
    assert calls == {"convert": 1, "calibrate": 1}
    assert record["float_layers"] == [layer] and partial != quantized


def test_a_float_tflite_quantizes_to_the_same_bytes_as_its_keras_model(trained_run, trained_tflite, digits,
                                                                         tmp_path):
    float_copy = tmp_path / "float.tflite"
    shutil.copy(trained_tflite["float"], float_copy)
    shutil.copy(trained_tflite["float"].with_name("float.manifest.json"), tmp_path / "float.manifest.json")
    common = ["--int8", "--calib", digits["samples"], "--calib-size", "64", "--json"]
    run_cli("convert", float_copy, *common, "--out", tmp_path / "from_tflite.tflite", check=True)
    run_cli("convert", trained_run.model_path, *common, "--out", tmp_path / "from_keras.tflite", check=True)
    assert (tmp_path / "from_tflite.tflite").read_bytes() == (tmp_path / "from_keras.tflite").read_bytes()
    manifest = json.loads((tmp_path / "from_tflite.manifest.json").read_text())
    method = manifest["calibration"]["method"]
    assert manifest["source"]["kind"] == "tflite" and method["calibrator"] == "fast-minmax"
    # quantized without TensorFlow's Python package, and still the same bytes as the TensorFlow route
    assert method["quantizer_route"] == "extension"
    assert json.loads((tmp_path / "from_keras.manifest.json").read_text())["calibration"]["method"][
        "quantizer_route"] == "tensorflow"
    assert manifest["labels"] == json.loads((tmp_path / "from_keras.manifest.json").read_text())["labels"]

    again = run_cli("convert", tmp_path / "from_tflite.tflite", *common, "--out", tmp_path / "twice.tflite")
    assert again.returncode == 2 and "is already quantized" in again.stderr and "Traceback" not in again.stderr
    fp16 = run_cli("convert", float_copy, "--fp16", "--out", tmp_path / "h.tflite")
    assert fp16.returncode == 2 and "--int8 only" in fp16.stderr and "Traceback" not in fp16.stderr
    assert not (tmp_path / "twice.tflite").exists() and not (tmp_path / "h.tflite").exists()


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
    quantized = convert.mlir_quantize(source.cache["calibrated"][2], input_data_type=tf.int8,
                                      output_data_type=tf.int8)
    ours = converter_hooks._deduplicate_readonly_buffers(quantized)
    theirs = convert.deduplicate_readonly_buffers(quantized)
    assert _structure(ours)[:2] == _structure(bytes(theirs))[:2]
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
