"""Standard TFLite metadata in every converted model, checked with real readers and clients.

The models are the session's trained tiny .tflite files, written by
``export_tflite``; nothing here adds the metadata by hand except the tests of
``add_metadata`` itself.
"""

import filecmp
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.tflite import flatbuffers
from pipeline.tflite import metadata_schema_py_generated as md
from pipeline.tflite import metadata
from pipeline.core.artifacts import manifest_path_for
from pipeline.core.errors import ConversionError
from pipeline.core.preprocessing import PreprocessSpec, model_tensor, pixels_for, scale
from pipeline.tflite.input_convention import file_convention
from pipeline.validation.predict import TfliteRunner
from tests.conftest import missing


def _manifest(path) -> dict:
    return json.loads(manifest_path_for(path).read_text())


def _held_out(digits) -> list:
    return sorted(digits["val"].glob("*/*.png"))


def _validate_top1(path, pixels: np.ndarray) -> np.ndarray:
    """Top-1 per image as ``xedge validate`` computes it: its runner, fed the decoded pixels in the model's own
    input convention (read from the model), quantized with the model's own scale and zero point."""
    runner = TfliteRunner(path, workers=1)
    try:
        return runner.predict_pixels(pixels).argmax(axis=1)
    finally:
        runner.close()


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_mediapipe_image_classifier_names_the_classes_and_agrees_with_validate(kind, trained_tflite, digits):
    """MediaPipe's ImageClassifier on every held-out digit as model-size RGB: the class names come from the
    metadata, and its top-1 is validate's on every image. Both models' inputs are exact: uint8 pixels, or
    float32 pixels through mean 0 / std 1, so the clients feed bit for bit what validate feeds."""
    if importlib.util.find_spec("mediapipe") is None:
        missing("needs mediapipe (the dev extra) for its ImageClassifier")
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    path = trained_tflite[kind]
    labels = _manifest(path)["labels"]
    spec = PreprocessSpec(size=71)
    images = _held_out(digits)
    pixels = np.stack([pixels_for(image, spec) for image in images])  # model-size RGB: MediaPipe resizes nothing
    ours = _validate_top1(path, pixels)
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)))
    theirs = []
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for one in pixels:
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(one)))
            categories = result.classifications[0].categories
            assert sorted(c.index for c in categories) == list(range(len(labels)))
            assert all(c.category_name == labels[c.index] for c in categories)  # names from the metadata
            theirs.append(categories[0].index)
    mismatched = [image.name for image, a, b in zip(images, ours, theirs) if a != b]
    assert not mismatched, f"MediaPipe's top-1 differs from validate's on {mismatched}"
    assert len(images) >= 30 and len(set(ours.tolist())) > 1  # a real comparison: many images, several classes


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_the_serving_signature_runs_with_named_input_and_output(kind, trained_tflite, digits):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(trained_tflite[kind]))
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["image"], "outputs": ["scores"]}}
    runner = interpreter.get_signature_runner("serving_default")
    inp = interpreter.get_input_details()[0]
    pixels = pixels_for(_held_out(digits)[0], PreprocessSpec(size=71))
    x = model_tensor(pixels[None], file_convention(trained_tflite[kind])[0], inp["dtype"], *inp["quantization"])
    by_name = runner(image=x)["scores"]
    by_index = Interpreter(model_path=str(trained_tflite[kind]))  # the same model, addressed by tensor index
    by_index.allocate_tensors()
    by_index.set_tensor(inp["index"], x)
    by_index.invoke()
    np.testing.assert_array_equal(by_name, by_index.get_tensor(by_index.get_output_details()[0]["index"]))


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_a_metadata_reader_gets_back_what_was_written(kind, trained_tflite):
    """Read with the schema's own reader from the TFLITE_METADATA buffer, found with LiteRT's model schema."""
    data = trained_tflite[kind].read_bytes()
    manifest = _manifest(trained_tflite[kind])
    assert manifest["output"]["sha256"] == hashlib.sha256(data).hexdigest()  # the hash covers the metadata
    model = flatbuffers.schema().Model.GetRootAs(data, 0)
    entries = {model.Metadata(i).Name(): model.Metadata(i).Buffer() for i in range(model.MetadataLength())}
    buffer = model.Buffers(entries[b"TFLITE_METADATA"]).DataAsNumpy().tobytes()
    assert md.ModelMetadata.ModelMetadataBufferHasIdentifier(buffer, 0)
    meta = md.ModelMetadata.GetRootAsModelMetadata(buffer, 0)
    assert meta.Name() == b"xception" and meta.Author() == b"xception-edge" and meta.MinParserVersion() == b"1.0.0"
    assert meta.Version() == manifest["versions"]["xception-edge"].encode()
    assert meta.Description().startswith(f"{kind} image classifier, 10 classes, 71x71 RGB input".encode())
    graph = meta.SubgraphMetadata(0)
    image, scores = graph.InputTensorMetadata(0), graph.OutputTensorMetadata(0)
    assert (image.Name(), scores.Name()) == (b"image", b"scores")
    assert image.Content().ContentPropertiesType() == md.ContentProperties.ImageProperties
    properties = md.ImageProperties()
    properties.Init(image.Content().ContentProperties().Bytes, image.Content().ContentProperties().Pos)
    assert properties.ColorSpace() == md.ColorSpaceType.RGB
    if kind == "float":  # the folded float model takes the pixels: (pixel - 0) / 1
        assert image.ProcessUnitsLength() == 1
        unit = image.ProcessUnits(0)
        assert unit.OptionsType() == md.ProcessUnitOptions.NormalizationOptions
        normalization = md.NormalizationOptions()
        normalization.Init(unit.Options().Bytes, unit.Options().Pos)
        assert (normalization.MeanAsNumpy().tolist(), normalization.StdAsNumpy().tolist()) == ([0.0], [1.0])
        assert (image.Stats().Min(0), image.Stats().Max(0)) == (0.0, 255.0)
    else:  # uint8 pixels: nothing to normalize
        assert image.ProcessUnitsLength() == 0
        assert (image.Stats().Min(0), image.Stats().Max(0)) == (0.0, 255.0)
    assert scores.AssociatedFilesLength() == 1
    labels_file = scores.AssociatedFiles(0)
    assert labels_file.Name() == b"labels.txt" and labels_file.Type() == md.AssociatedFileType.TENSOR_AXIS_LABELS
    packed = metadata.associated_files(data)
    assert list(packed) == ["labels.txt"] and packed["labels.txt"].decode().splitlines() == manifest["labels"]


def test_the_clients_normalization_is_the_preprocessing_scale_within_one_ulp():
    """What a client computes from the metadata, (p - mean) / std, against ``x / 127.5 - 1`` (README figure)."""
    mean, std = PreprocessSpec(size=71).normalization
    pixels = np.arange(256, dtype=np.float32)
    ours = scale(pixels)
    theirs = (pixels - np.float32(mean)) / np.float32(std)
    assert np.abs(theirs - ours).max() <= 2.0 ** -24  # one float32 ulp in [0.5, 1): the rounding of x / 127.5 - 1
    assert int(np.count_nonzero(theirs != ours)) == 128


def test_adding_metadata_again_replaces_it(trained_tflite):
    data = trained_tflite["float"].read_bytes()
    plain = metadata.ModelInfo("other", "9", "no labels")
    once = metadata.add_metadata(data, plain)
    assert metadata.add_metadata(once, plain) == once
    relabelled = metadata.ModelInfo("x", "1", "d", labels=[f"c{i}" for i in range(10)], mean=0.0, std=1.0)
    assert metadata.add_metadata(metadata.add_metadata(once, relabelled), plain) == once
    assert metadata.associated_files(once) == {}  # the old labels file went with the old metadata
    assert len(flatbuffers.read(once).buffers) == len(flatbuffers.read(data).buffers)
    meta = metadata.read_metadata(once)
    assert (meta.name, meta.description) == (b"other", b"no labels")
    assert meta.subgraphMetadata[0].outputTensorMetadata[0].associatedFiles is None
    normalization = metadata.read_metadata(metadata.add_metadata(data, relabelled))
    assert normalization.subgraphMetadata[0].inputTensorMetadata[0].processUnits[0].options.mean == [0.0]
    assert len(flatbuffers.read(once).signatureDefs) == 1


def test_metadata_that_cannot_describe_the_model_is_refused(trained_tflite):
    data = trained_tflite["float"].read_bytes()
    with pytest.raises(ConversionError, match="3 class names for a model with 10 outputs"):
        metadata.add_metadata(data, metadata.ModelInfo("x", "1", "d", labels=["a", "b", "c"]))
    with pytest.raises(ConversionError, match="std"):
        metadata.ModelInfo("x", "1", "d", mean=0.0, std=0.0)
    with pytest.raises(ConversionError, match="line break"):
        metadata.ModelInfo("x", "1", "d", labels=["a\nb"])


def test_the_vendored_schema_is_mediapipes():
    spec = importlib.util.find_spec("mediapipe")  # found, not imported
    if spec is None:
        pytest.skip("mediapipe is not installed")
    theirs = Path(spec.submodule_search_locations[0]) / "tasks" / "metadata" / "metadata_schema_py_generated.py"
    assert filecmp.cmp(md.__file__, theirs, shallow=False)
