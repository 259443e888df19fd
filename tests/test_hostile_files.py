"""Data files, model files and manifests crafted against the readers: each ends in a listed skip or one error line.

Every crafted file is generated here from a short generator; nothing binary is committed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ArtifactError, DeviceError, ModelLoadError
from tests.conftest import invoke_cli, run_cli


def bigtiff_offset_overflow() -> bytes:
    """A 1x1 BigTIFF whose strip offset is 2**64 - 1: Pillow's decoder seeks there (OverflowError in load())."""
    tags = {256: 1, 257: 1, 258: 8, 259: 1, 262: 1, 273: None, 278: 1, 279: 1}
    entries = b""
    for tag, value in tags.items():
        if value is None:
            entries += struct.pack("<HHQQ", tag, 16, 1, 2**64 - 1)  # LONG8
        else:
            entries += struct.pack("<HHQHHI", tag, 3, 1, value, 0, 0)  # SHORT
    return b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", len(tags)) + entries + b"\0" * 8


@pytest.fixture(scope="module")
def tiny_float(tmp_path_factory, tiny_keras_path) -> Path:
    """The untrained tiny Xception as a float .tflite with its manifest (no training needed for these files)."""
    from pipeline.conversion.export import ConvertSettings, export_tflite

    out = tmp_path_factory.mktemp("hostile") / "float.tflite"
    return export_tflite(tiny_keras_path, ConvertSettings("float"), out=out).path


def _folder_with(digits, tmp_path: Path, name: str, data: bytes) -> Path:
    """A copy of a few digits samples (one subfolder per class) plus one crafted file in class 0."""
    folder = tmp_path / "images"
    for k, sub in enumerate(sorted(Path(digits["samples"]).iterdir())):
        (folder / sub.name).mkdir(parents=True)
        for f in sorted(sub.iterdir())[:3]:
            shutil.copy(f, folder / sub.name / f.name)
    (folder / "0" / name).write_bytes(data)
    return folder


def test_a_crafted_tiff_is_a_listed_skip_not_a_traceback(digits, tmp_path):
    from calibrate.dataset import build_calibration_set
    from pipeline.core.preprocessing import ImageError, PreprocessSpec, decode_rgb

    crafted = bigtiff_offset_overflow()
    with pytest.raises(ImageError, match="OverflowError"):
        decode_rgb(crafted, "crafted.tif")
    folder = _folder_with(digits, tmp_path, "crafted.tif", crafted)
    cal = build_calibration_set(folder, PreprocessSpec(size=71), size=64, seed=0)
    assert [s.path for s in cal.skipped] == [str(folder / "0" / "crafted.tif")]
    assert len(cal) == 30


def test_an_empty_npy_is_a_listed_skip_not_a_black_image(digits, tmp_path):
    import io

    from calibrate.dataset import build_calibration_set
    from pipeline.core.preprocessing import PreprocessSpec

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((0, 0, 3), np.uint8), allow_pickle=False)
    folder = _folder_with(digits, tmp_path, "empty.npy", buffer.getvalue())
    cal = build_calibration_set(folder, PreprocessSpec(size=71), size=64, seed=0)
    assert [(Path(s.path).name, "empty" in s.reason) for s in cal.skipped] == [("empty.npy", True)]
    assert len(cal) == 30 and not any(sample.size and not sample.any() for sample in cal.samples)


def test_names_that_are_not_utf8_are_listed_skips_and_reports_are_written(digits, tiny_float, tmp_path):
    from pipeline.core.data import discover

    folder = _folder_with(digits, tmp_path, "ok.png", (Path(digits["samples"]) / "0").iterdir().__next__()
                          .read_bytes())
    bad_file = os.path.join(os.fsencode(folder / "1"), b"img\xfe.png")
    shutil.copy(folder / "0" / "ok.png", bad_file)
    bad_class = os.path.join(os.fsencode(folder), b"cl\xff")
    os.mkdir(bad_class)
    shutil.copy(folder / "0" / "ok.png", os.path.join(bad_class, b"a.png"))
    found = discover(folder)
    reasons = {s.path: s.reason for s in found.skipped}
    assert reasons == {str(folder / "1") + "/img\\xfe.png": "file or folder name is not valid UTF-8; rename it",
                       str(folder) + "/cl\\xff": "class folder name is not valid UTF-8; rename it"}
    json.dumps(reasons, ensure_ascii=False).encode("utf-8")  # every skip is text
    assert found.classes == [str(d) for d in range(10)]
    proc = invoke_cli("xedge", "validate", tiny_float, tiny_float, "--data", folder, "--report", tmp_path / "rep",
                      cwd=tmp_path)  # in-process (CliRunner): the report is what is checked
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert "img\\\\xfe.png" in json.dumps(report) and (tmp_path / "rep" / "report.md").exists()


# ---------------------------------------------------------------- .tflite files with crafted metadata and shapes


def _rewritten(source: Path, out: Path, change) -> Path:
    from pipeline.tflite import flatbuffers

    model = flatbuffers.read(source.read_bytes())
    change(model)
    out.write_bytes(flatbuffers.write(model))
    return out


def _metadata_entry(model):
    return next(e for e in model.metadata if e.name in (b"TFLITE_METADATA", "TFLITE_METADATA"))


def _metadata_past_the_buffers(model):
    _metadata_entry(model).buffer = len(model.buffers) + 7


def _metadata_truncated(model):
    model.buffers[_metadata_entry(model).buffer].data = np.frombuffer(b"\x40\x00\x00\x00M001", np.uint8)


def _metadata_not_utf8(model):
    buffer = model.buffers[_metadata_entry(model).buffer]
    data = buffer.data.tobytes()
    name = b"xception-edge"  # the author field every converted model carries
    assert name in data
    buffer.data = np.frombuffer(data.replace(name, b"\xff" * len(name)), np.uint8)


@pytest.mark.parametrize("change", [_metadata_past_the_buffers, _metadata_truncated, _metadata_not_utf8])
def test_malformed_metadata_is_one_typed_error_for_every_reader(tiny_float, tmp_path, change):
    from pipeline.tflite.input_convention import file_convention
    from pipeline.tflite.metadata import read_metadata

    crafted = _rewritten(tiny_float, tmp_path / "crafted.tflite", change)  # no manifest beside it
    data = crafted.read_bytes()
    with pytest.raises(ModelLoadError, match="invalid model"):
        read_metadata(data)
    try:
        file_convention(crafted, data)
    except ModelLoadError:
        pass
    proc = run_cli("xedge", "bench", crafted, "--runs", "1", "--warmup", "0", cwd=tmp_path, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0 or (len(lines) == 1 and "invalid model" in lines[0]), proc.stderr


def test_metadata_past_the_buffers_in_validate_and_convert(tiny_float, digits, tmp_path):
    crafted = _rewritten(tiny_float, tmp_path / "crafted.tflite", _metadata_past_the_buffers)
    for args in (("xedge", "validate", tiny_float, crafted, "--data", digits["val"], "--report", tmp_path / "r"),
                 ("convert", crafted, "--int8", "--calib", digits["samples"], "--out", tmp_path / "q.tflite")):
        # validate in-process (CliRunner: no TensorFlow start-up); convert, which needs no TensorFlow for a
        # .tflite, in a real process
        proc = invoke_cli(*args, cwd=tmp_path) if args[0] == "xedge" else run_cli(*args, cwd=tmp_path, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "invalid model" in lines[0], proc.stderr
    assert not (tmp_path / "q.tflite").exists()


def test_a_huge_input_shape_is_refused_before_calibration_allocates_it(tiny_float, digits, tmp_path):
    def huge(model):
        graph = model.subgraphs[0]
        graph.tensors[int(graph.inputs[0])].shape = np.array([1, 100_000, 100_000, 3], np.int32)

    crafted = _rewritten(tiny_float, tmp_path / "huge.tflite", huge)
    proc = run_cli("convert", crafted, "--int8", "--calib", digits["samples"], "--out", tmp_path / "q.tflite",
                   cwd=tmp_path, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "MemoryError" not in proc.stderr and ("2048" in lines[0] or "invalid model" in lines[0])


# ---------------------------------------------------------------- manifests


def _pair(tiny_float: Path, tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "m.tflite"
    shutil.copy(tiny_float, model)
    manifest = tmp_path / "m.manifest.json"
    shutil.copy(tiny_float.with_name("float.manifest.json"), manifest)
    return model, manifest


@pytest.mark.parametrize("edit", [
    lambda m: m["preprocessing"].update(input_convention="bogus"),
    lambda m: m.update(preprocessing="x"),
    lambda m: m["output"].update(bytes="many"),
    lambda m: m.update(labels=[1, 2]),
])
def test_a_manifest_with_bad_values_is_one_error_naming_it(tiny_float, tmp_path, edit):
    from pipeline.core import artifacts
    from pipeline.tflite.sandboxed_load import check_manifest

    model, manifest = _pair(tiny_float, tmp_path)
    recorded = json.loads(manifest.read_text())
    edit(recorded)  # the sha256 stays right: only the values are wrong
    manifest.write_text(json.dumps(recorded))
    with pytest.raises(ArtifactError, match=f"manifest {manifest} is malformed"):
        artifacts.read_manifest(manifest)
    with pytest.raises(ModelLoadError, match=f"its manifest {manifest} is unreadable \\(malformed"):
        check_manifest(model, model.read_bytes())
    proc = run_cli("xedge", "bench", model, "--runs", "1", "--warmup", "0", cwd=tmp_path, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and str(manifest.name) in lines[0], proc.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "huge"])
def test_a_manifest_that_is_not_a_small_regular_file_is_refused_at_once(tiny_float, tmp_path, kind):
    from pipeline.core import artifacts
    from pipeline.core.manifest_schema import MAX_MANIFEST_BYTES
    from pipeline.tflite.sandboxed_load import check_manifest

    model, manifest = _pair(tiny_float, tmp_path)
    manifest.unlink()
    if kind == "fifo":
        os.mkfifo(manifest)
    elif kind == "dev_zero":
        manifest.symlink_to("/dev/zero")
    else:
        with open(manifest, "wb") as f:
            f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ArtifactError, match="cannot read manifest"):
        artifacts.read_manifest(manifest)
    with pytest.raises(ModelLoadError, match="is unreadable"):
        check_manifest(model, model.read_bytes())
    proc = run_cli("xedge", "bench", model, "--runs", "1", "--warmup", "0", cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "unreadable" in lines[0], proc.stderr


def test_the_device_runner_reads_a_manifest_the_same_way(tmp_path):
    from devices.runner import manifest_convention

    base = tmp_path / "m"
    os.mkfifo(f"{base}.manifest.json")
    assert manifest_convention(f"{base}.tflite") is None  # not blocked on the FIFO
    os.unlink(f"{base}.manifest.json")
    Path(f"{base}.manifest.json").write_text(json.dumps({"preprocessing": "x"}))
    assert manifest_convention(f"{base}.tflite") == "signed_unit"
    Path(f"{base}.manifest.json").write_text(json.dumps({"preprocessing": {"input_convention": "bogus"}}))
    assert manifest_convention(f"{base}.tflite") is None
    Path(f"{base}.manifest.json").write_text(json.dumps({"preprocessing": {"input_convention": "pixels"}}))
    assert manifest_convention(f"{base}.tflite") == "pixels"


# ---------------------------------------------------------------- device outputs


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("data", [
    b"",
    _npy(np.zeros((4, 10), np.float32))[:-7],                       # truncated
    b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4', 'fortran_order': False, 'shape': (4, 10), }" + b"\0" * 8,
    b"\x93NUMPY\x01\x00\x08\x00{'descr'\n" + b"\0" * 64,          # malformed header
    _npy(np.array([{"a": 1}], dtype=object)),                        # pickled objects
    _npy(np.zeros((3, 10), np.float32)),                            # 3 rows for 4 images
    _npy(np.zeros((0,), np.float32)),
    _npy(np.array(["a", "b", "c", "d"])),
])
def test_malformed_device_outputs_are_a_device_error(tmp_path, data):
    from devices.parity_target import DeviceTarget
    from devices.profile import load_profile

    profile_path = tmp_path / "here.toml"
    profile_path.write_text('transport = "local"\ndescription = "here"\n')
    target = DeviceTarget(load_profile(str(profile_path)), tmp_path / "m.tflite")
    out = tmp_path / "m_output0.npy"
    out.write_bytes(data)
    with pytest.raises(DeviceError, match="device here"):
        target.read_outputs(out, 4)
    out.write_bytes(_npy(np.zeros((4, 10), np.float32)))
    assert target.read_outputs(out, 4).shape == (4, 10)
