"""Each conversion mode, each source format, the manifest, and refusing to overwrite."""

import json

import numpy as np
import pytest

from pipeline.core.artifacts import manifest_path_for, sha256_bytes, sha256_file
from pipeline.core.errors import CalibrationError, ConversionError, ModelLoadError, OutputExistsError, Remedy
from pipeline.conversion.export import ConvertSettings, check_integer_ops, export_tflite
from pipeline.tflite.contents import inspect_tflite
from pipeline.tflite.metadata import read_metadata

HEAVY = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _interpreter(path):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=path.read_bytes())
    it.allocate_tensors()
    return it


def _op_types(it):
    """(op name, result dtype) for every node, as LiteRT itself reports them."""
    return {(d["op_name"], np.dtype(d["result_types"][0]).name) for d in it._get_ops_details()
            if d["op_name"] != "DELEGATE"}


EXPECT = {
    # mode: (input dtype, output dtype, heavy-op result dtype, weight dtypes that must appear)
    "float": ("float32", "float32", "float32", {"float32"}),
    "dynamic": ("float32", "float32", "float32", {"int8"}),
    "fp16": ("float32", "float32", "float32", {"float16"}),
    "int8": ("uint8", "uint8", "int8", {"int8"}),  # RGB pixels in, probabilities x 256 out
    "int16x8": ("int16", "int16", "int16", {"int8"}),
}


@pytest.mark.parametrize("mode", list(EXPECT))
def test_each_mode_has_the_promised_types(mode, tiny_keras_path, calibration, tmp_path):
    out = tmp_path / f"m_{mode}.tflite"
    result = export_tflite(tiny_keras_path, ConvertSettings(mode), out=out,
                           representative=calibration if mode in ("int8", "int16x8") else None)
    in_dtype, out_dtype, heavy_dtype, weights = EXPECT[mode]
    it = _interpreter(out)
    assert it.get_input_details()[0]["dtype"].__name__ == in_dtype
    assert it.get_output_details()[0]["dtype"].__name__ == out_dtype
    ops = _op_types(it)
    heavy = {dtype for op, dtype in ops if op in HEAVY}
    assert heavy == {heavy_dtype}, ops
    assert weights <= set(result.manifest["ops"]["weight_dtypes"])
    if mode == "int8":
        assert result.manifest["ops"]["left_float"] == []
        assert it.get_input_details()[0]["quantization"] == (1.0, 0)
    # the model runs on realistic input, in its own input convention
    from pipeline.core.preprocessing import model_input

    convention = result.manifest["input_convention"]["name"]
    assert convention == ("signed_unit" if mode == "int16x8" else "pixels")
    x = model_input(np.random.default_rng(0).integers(0, 256, (1, 71, 71, 3)).astype(np.uint8), convention)
    detail = it.get_input_details()[0]
    if detail["dtype"] != np.float32:
        s, z = detail["quantization"]
        x = np.clip(np.round(x / s + z), np.iinfo(detail["dtype"]).min, np.iinfo(detail["dtype"]).max)
    it.set_tensor(detail["index"], x.astype(detail["dtype"]))
    it.invoke()
    assert np.isfinite(it.get_tensor(it.get_output_details()[0]["index"]).astype(np.float32)).all()
    # every mode carries the standard metadata; clients need NormalizationOptions for a float input only
    image = read_metadata(out.read_bytes()).subgraphMetadata[0].inputTensorMetadata[0]
    assert (image.processUnits is not None) == (in_dtype == "float32")
    assert list(it.get_signature_list()) == ["serving_default"]


def test_float_io_keeps_float_interface(tiny_keras_path, calibration, tmp_path):
    export_tflite(tiny_keras_path, ConvertSettings("int8", float_io=True), out=tmp_path / "f.tflite",
                  representative=calibration)
    it = _interpreter(tmp_path / "f.tflite")
    assert it.get_input_details()[0]["dtype"] == np.float32
    assert {d for op, d in _op_types(it) if op in HEAVY} == {"int8"}


def test_int8_tracks_the_float_model(trained_run, trained_tflite, digits):
    """The calibrated int8 model predicts like the Keras model it came from."""
    import keras

    from pipeline.core.data import discover
    from pipeline.core.preprocessing import PreprocessSpec, pixels_for, scale

    model = keras.saving.load_model(trained_run.model_path)
    items = discover(digits["val"]).items[::6]
    pixels = np.stack([pixels_for(i.path, PreprocessSpec(71)) for i in items])
    ref = model.predict(scale(pixels), verbose=0).argmax(1)
    it = _interpreter(trained_tflite["int8"])
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    got = []
    for sample in pixels:  # the int8 model takes the pixels themselves
        it.set_tensor(inp["index"], sample[None])
        it.invoke()
        got.append(int(it.get_tensor(out["index"]).argmax()))
    agreement = float(np.mean(np.asarray(got) == ref))
    labels = np.asarray([trained_run.classes.index(i.label) for i in items])
    assert agreement >= 0.9, agreement
    assert float(np.mean(np.asarray(got) == labels)) >= 0.8


def test_manifest_tells_the_story(trained_run, trained_tflite, calibration):
    path = trained_tflite["int8"]
    manifest = json.loads(manifest_path_for(path).read_text())
    assert manifest_path_for(path).name == "int8.manifest.json"
    assert manifest["tool"] == "xception-edge" and manifest["schema"] == 1
    assert manifest["output"]["sha256"] == sha256_file(path)
    assert manifest["output"]["bytes"] == path.stat().st_size
    assert manifest["source"]["sha256"] == sha256_file(trained_run.model_path)
    assert manifest["source"]["kind"] == "keras3"
    assert manifest["settings"]["mode"] == "int8" and manifest["settings"]["per_channel"] is True
    assert manifest["versions"]["tensorflow"].startswith("2.21")
    assert manifest["preprocessing"]["fingerprint"] == calibration.with_convention("pixels").spec.fingerprint
    assert manifest["preprocessing"]["fingerprint"] != calibration.spec.fingerprint  # the convention is hashed
    assert manifest["preprocessing"]["input_convention"] == manifest["settings"]["input_convention"] == "pixels"
    assert manifest["input_convention"]["normalization"] == {"mean": 0.0, "std": 1.0}
    assert manifest["calibration"]["method"]["input_range"] == [0.0, 255.0]
    cal = manifest["calibration"]
    assert cal["count"] == len(calibration) == len(cal["files"])
    assert all(len(f["sha256"]) == 64 for f in cal["files"])
    assert manifest["io"]["inputs"][0]["dtype"] == "uint8" and manifest["io"]["inputs"][0]["shape"] == [1, 71, 71, 3]
    assert manifest["io"]["outputs"][0]["scale"] > 0
    assert manifest["ops"]["histogram"]["CONV_2D/int8"] > 0 and manifest["ops"]["left_float"] == []
    assert manifest["labels"] == trained_run.classes


def test_source_formats(tmp_path, calibration, trained_run):
    import keras
    import tf_keras

    sm = tmp_path / "saved"
    keras.saving.load_model(trained_run.model_path).export(str(sm), verbose=False)
    tk = tf_keras.Sequential([tf_keras.layers.InputLayer((71, 71, 3)),
                              tf_keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
                              tf_keras.layers.GlobalAveragePooling2D(),
                              tf_keras.layers.Dense(10, activation="softmax")])
    tk.save(tmp_path / "legacy.h5")
    tk.save(tmp_path / "legacy.keras")
    for src, kind in [(sm, "saved_model"), (tmp_path / "legacy.h5", "tf_keras"), (tmp_path / "legacy.keras", "tf_keras")]:
        result = export_tflite(src, ConvertSettings("int8"), out=tmp_path / f"{src.name}.tflite",
                               representative=calibration)
        assert result.manifest["source"]["kind"] == kind
        assert result.manifest["ops"]["left_float"] == []
        # a SavedModel has no Keras layers to fold into; the tf_keras model's stem folds into its bias
        expected = ("int8", "signed_unit") if kind == "saved_model" else ("uint8", "pixels")
        assert (result.manifest["io"]["inputs"][0]["dtype"], result.manifest["input_convention"]["name"]) == expected


def test_existing_output_is_never_overwritten(tiny_keras_path, tmp_path):
    out = tmp_path / "m.tflite"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="output exists") as refused:
        export_tflite(tiny_keras_path, ConvertSettings("float"), out=out)
    assert refused.value.remedy == Remedy.FORCE
    assert out.read_bytes() == b"precious"
    assert not manifest_path_for(out).exists()
    result = export_tflite(tiny_keras_path, ConvertSettings("float"), out=out, force=True)
    assert sha256_bytes(out.read_bytes()) == result.manifest["output"]["sha256"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_refusals(tiny_keras_path, tmp_path):
    with pytest.raises(CalibrationError, match="needs calibration images") as refused:
        export_tflite(tiny_keras_path, ConvertSettings("int8"), out=tmp_path / "a.tflite")
    assert refused.value.remedy == Remedy.CALIBRATION_IMAGES
    with pytest.raises(ModelLoadError, match="not found"):
        export_tflite(tmp_path / "missing.keras", ConvertSettings("float"), out=tmp_path / "b.tflite")
    with pytest.raises(ConversionError, match="unknown mode"):
        ConvertSettings("int4")
    with pytest.raises(ConversionError, match=".tflite"):
        export_tflite(tiny_keras_path, ConvertSettings("float"), out=tmp_path / "c.bin")
    assert not (tmp_path / "a.tflite").exists()


def test_int8_gate_names_float_compute_ops(tiny_keras_path, tmp_path):
    """A model whose convs are float fails the --int8 contract unless fallback is allowed."""
    export_tflite(tiny_keras_path, ConvertSettings("dynamic"), out=tmp_path / "d.tflite")
    info = inspect_tflite((tmp_path / "d.tflite").read_bytes())
    with pytest.raises(ConversionError, match=r"compute ops stayed float.*CONV_2D") as refused:
        check_integer_ops(info, ConvertSettings("int8"))
    assert refused.value.remedy == Remedy.ALLOW_FLOAT_FALLBACK
    check_integer_ops(info, ConvertSettings("int8", allow_float_fallback=True))
    check_integer_ops(info, ConvertSettings("dynamic"))


def test_input_quantization_matches_tflite_quantize_op_bit_for_bit(tiny_keras_path, calibration, tmp_path):
    """Our quantize() is the QUANTIZE op a --float-io model runs first, halves and saturation included."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from pipeline.core.preprocessing import quantize

    # [-1, 1] input (scale ~2/255): the QUANTIZE of a pixel input has scale 1, where exact halves are common
    # and the builtin kernel's scalar tail rounds them away from zero; pixel values are integers, never halves.
    old = ConvertSettings("int8", float_io=True, optimize=False, input_convention="signed_unit")
    export_tflite(tiny_keras_path, old, out=tmp_path / "fio.tflite", representative=calibration)
    rng = np.random.default_rng(3)
    for resolver in (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, OpResolverType.AUTO):  # builtin, XNNPACK
        it = Interpreter(model_content=(tmp_path / "fio.tflite").read_bytes(),
                         experimental_op_resolver_type=resolver, experimental_preserve_all_tensors=True)
        it.allocate_tensors()
        quant_op = next(d for d in it._get_ops_details() if d["op_name"] == "QUANTIZE")
        out = it.get_tensor_details()[quant_op["outputs"][0]]
        scale, zero = out["quantization"]
        k = rng.integers(-130, 130, size=(1, 71, 71, 3))
        halves = ((k + 0.5) * np.float32(scale)).astype(np.float32)  # ties, and values past the int8 range
        halves[0, 0, :5, 0] = [-1.0, 1.0, 0.0, -0.0, np.float32(scale) * 0.5]
        for x in (halves, rng.uniform(-1.2, 1.2, (1, 71, 71, 3)).astype(np.float32)):
            it.set_tensor(it.get_input_details()[0]["index"], x)
            it.invoke()
            assert np.array_equal(it.get_tensor(out["index"]), quantize(x, np.int8, scale, zero)), resolver
