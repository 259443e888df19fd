"""Models users bring, through ``convert --int8`` to the device-ready model: uint8 pixels in, uint8 out.

Real architectures from ``keras.applications``, built without weights at a
small input size, with a fixed seed and BatchNorm statistics spread away from
their initial values (so every layer matters and the outputs differ between
images): Xception nested as in Keras' transfer-learning guide, MobileNetV2
('same'-padded stem), MobileNetV3Small (its own Rescaling, 'same'-padded
stem), EfficientNetB0 (Rescaling + Normalization, ZeroPadding2D stem) and
ResNet50 (ZeroPadding2D stem); and tiny tf_keras (Keras 2) functional models
saved as .h5, as users bring them: a base network nested in a
transfer-learning model, its own Rescaling in front, and a nested base whose
stem is a ZeroPadding2D. Each is converted once per module.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from pipeline.conversion.export import ConvertSettings, export_tflite
from pipeline.core.preprocessing import PreprocessSpec, model_input, pixels_for
from pipeline.model.flatten import flatten
from pipeline.model.modelio import load_source
from pipeline.model.stem import Stem, StemPad, border_error, find_stem, fold_stem
from pipeline.tflite.runtime import open_interpreter
from pipeline.validation.layer_error import layer_errors
from pipeline.validation.predict import TfliteRunner
from pipeline.validation.validate import input_approximation, validate
from tests.conftest import missing, spread_batchnorm

U = 2.0 ** -24  # float32 unit roundoff


def _nested_xception():
    """Keras' transfer-learning guide: the base called with training=False, pooling, Dense, Dropout, logits."""
    import keras

    base = spread_batchnorm(keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3)))
    inputs = keras.Input((71, 71, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
    x = keras.layers.Dropout(0.2)(keras.layers.Dense(16, activation="relu")(x))
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="fine_tuned")


def _application(name: str, **kwargs) -> Callable:
    def build():
        import keras

        return spread_batchnorm(getattr(keras.applications, name)(input_shape=(32, 32, 3), weights=None, classes=10,
                                                         **kwargs))
    return build


def _tf_keras(kind: str) -> Callable:
    """A small tf_keras functional classifier: the base (stem convolution, BatchNorm, a residual block) nested in
    a transfer-learning model (``nested``, ``padded``: a ZeroPadding2D stem) or called inline after the model's
    own ``Rescaling(1 / 127.5, offset=-1)`` (``rescaling``: the model takes pixels)."""
    def build():
        import tf_keras

        layers = tf_keras.layers
        tf_keras.utils.set_random_seed(0)
        inner = tf_keras.Input((32, 32, 3))
        x = layers.ZeroPadding2D(((1, 1), (1, 1)), name="stem_pad")(inner) if kind == "padded" else inner
        x = layers.Conv2D(8, 3, strides=2, use_bias=False, name="stem_conv")(x)
        x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
        y = layers.Conv2D(8, 3, padding="same", activation="relu", name="block1_conv")(x)
        base = spread_batchnorm(tf_keras.Model(inner, layers.Add(name="block1_add")([x, y]), name="base"))
        inputs = tf_keras.Input((32, 32, 3))
        x = layers.Rescaling(1 / 127.5, offset=-1, name="rescale")(inputs) if kind == "rescaling" else inputs
        x = layers.GlobalAveragePooling2D()(base(x, training=False))
        outputs = layers.Dense(10, activation="softmax", name="probs")(layers.Dropout(0.2)(x))
        return tf_keras.Model(inputs, outputs, name="fine_tuned")
    return build


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable
    size: int
    conv: str  # the stem convolution the input scaling folds into
    domain: str  # what the Keras model itself takes
    exact: bool  # whether its padding (if any) is a whole pixel
    inner: str  # a layer the per-layer report must name
    inlined: list = field(default_factory=list)
    suffix: str = ".keras"


ARCHS = [
    Arch("xception_nested", _nested_xception, 71, "block1_conv1", "signed_unit", True, "block4_sepconv2",
         ["xception"]),
    Arch("mobilenet_v2", _application("MobileNetV2", alpha=0.35), 32, "Conv1", "signed_unit", False,
         "block_3_project"),
    Arch("mobilenet_v3_small", _application("MobileNetV3Small", alpha=0.75), 32, "conv", "pixels", False,
         "expanded_conv_project"),
    Arch("efficientnet_b0", _application("EfficientNetB0"), 32, "stem_conv", "pixels", True, "block2a_project_conv"),
    Arch("resnet50", _application("ResNet50"), 32, "conv1_conv", "signed_unit", False, "conv2_block1_1_conv"),
    Arch("tf_keras_nested", _tf_keras("nested"), 32, "stem_conv", "signed_unit", True, "block1_conv", ["base"],
         ".h5"),
    Arch("tf_keras_rescaling", _tf_keras("rescaling"), 32, "stem_conv", "pixels", True, "block1_conv", ["base"],
         ".h5"),
    Arch("tf_keras_padded", _tf_keras("padded"), 32, "stem_conv", "signed_unit", False, "block1_conv", ["base"],
         ".h5"),
]


# Xception at 71 px is the heaviest by far (20 M parameters): ``make test`` runs it, ``make test-fast`` skips it.
@pytest.fixture(scope="module", params=[pytest.param(a, marks=[pytest.mark.slow] if a.name == "xception_nested"
                                                     else [])
                                        for a in ARCHS], ids=[a.name for a in ARCHS])
def user_model(request, tmp_path_factory, digits) -> dict:
    """One architecture saved as .keras and converted with ``convert --int8``'s defaults."""
    import keras
    from calibrate.dataset import build_calibration_set

    arch = request.param
    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp(arch.name)
    path = folder / f"{arch.name}{arch.suffix}"
    arch.build().save(path)
    calibration = build_calibration_set(digits["samples"], PreprocessSpec(size=arch.size), size=16, seed=0)
    source = load_source(path)
    result = export_tflite(path, ConvertSettings("int8"), out=folder / "int8.tflite", representative=calibration,
                           source=source)
    return {"arch": arch, "keras": path, "tflite": result.path, "manifest": result.manifest, "source": source}


def test_convert_int8_gives_uint8_pixels_and_states_the_stem(user_model):
    arch, manifest = user_model["arch"], user_model["manifest"]
    record = manifest["input_convention"]
    assert record["name"] == "pixels"
    (inp,), (out,) = manifest["io"]["inputs"], manifest["io"]["outputs"]
    assert (inp["dtype"], inp["scale"], inp["zero_point"]) == ("uint8", 1.0, 0) and out["dtype"] == "uint8"
    stem = record["stem"]
    assert stem["folded_layers"][-1] == arch.conv and stem["domain"] == arch.domain and stem["exact"] == arch.exact
    assert manifest["source"]["inlined_models"] == arch.inlined
    assert manifest["source"]["kind"] == ("tf_keras" if arch.suffix == ".h5" else "keras3")
    if arch.domain == "pixels":
        assert "its own normalization layers" in record["why"] and len(stem["folded_layers"]) > 1
    if arch.exact:
        assert "approximation" not in record["why"] and "effect" not in stem
        assert input_approximation(manifest) is None
    else:  # [-1, 1]'s zero pad is pixel 127.5: padded with 128 instead, stated with its measured effect
        assert stem["zero_pad_pixel"] == [127.5] * 3 and stem["pad_pixel"] == [128] * 3
        assert "approximation" in record["why"] and stem["effect"]["images"] == 16
        stated = input_approximation(manifest)  # what validate's report prints for the candidate
        assert "pixel 128 where its zero is pixel 127.5" in stated and "16 calibration images" in stated


def _validate_top1(path, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    runner = TfliteRunner(path, workers=1)
    try:
        scores = runner.predict_pixels(pixels)
        return scores, scores.argmax(axis=1)
    finally:
        runner.close()


def test_mediapipe_loads_it_and_agrees_with_validate_on_every_held_out_image(user_model, digits):
    """MediaPipe's ImageClassifier (every class's score) against validate's runner, on every held-out digit as
    model-size RGB: the same uint8 pixels into the same integer graph, so the same scores and the same top-1."""
    if importlib.util.find_spec("mediapipe") is None:
        missing("needs mediapipe (the dev extra) for its ImageClassifier")
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    spec = PreprocessSpec(size=user_model["arch"].size)
    images = sorted(digits["val"].glob("*/*.png"))
    pixels = np.stack([pixels_for(image, spec) for image in images])
    ours, top1 = _validate_top1(user_model["tflite"], pixels)
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(user_model["tflite"])),
                                            max_results=-1)
    theirs = np.zeros_like(ours)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for row, one in enumerate(pixels):
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(one)))
            for category in result.classifications[0].categories:
                theirs[row, category.index] = category.score
    assert np.allclose(theirs, ours, rtol=0, atol=1e-6), np.abs(theirs - ours).max()
    mismatched = [image.name for image, a, b in zip(images, top1, theirs.argmax(axis=1)) if a != b]
    assert not mismatched, f"MediaPipe's top-1 differs from validate's on {mismatched}"
    assert len(images) >= 300 and np.ptp(ours, axis=0).max() > 0  # many images, and the scores move


def test_the_256_pixel_values_are_256_input_levels_and_the_pad_is_the_stated_pixel(user_model, tmp_path):
    """Through validate's decode-and-feed path, an image holding every value gives the model the pixels as they
    are; inside, the padded stem input holds those pixels and, on its border, exactly the manifest's pad pixel."""
    arch, stem = user_model["arch"], user_model["manifest"]["input_convention"]["stem"]
    size = arch.size
    values = (np.arange(size * size * 3) % 256).astype(np.uint8).reshape(size, size, 3)
    png = tmp_path / "levels.png"
    Image.fromarray(values).save(png)
    pixels = pixels_for(png, PreprocessSpec(size=size))
    assert np.array_equal(pixels, values)
    runner = TfliteRunner(user_model["tflite"], workers=1)
    try:
        assert runner.convention == "pixels"
        fed = model_input(pixels[None], runner.convention)
    finally:
        runner.close()
    interpreter = open_interpreter(user_model["tflite"].read_bytes(), preserve_all_tensors=True)
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], fed.astype(np.uint8))
    assert np.array_equal(fed[0], values) and len(np.unique(fed.astype(np.uint8))) == 256
    interpreter.invoke()
    if "padding" not in stem:
        return
    pads = [op for op in interpreter._get_ops_details() if op["op_name"] in ("PAD", "PADV2")]
    if not pads:  # the converter made PAD + VALID a SAME convolution, which pads with the input's zero: pixel 0
        assert stem["pad_pixel"] == [0, 0, 0]
        return
    out = {d["index"]: d for d in interpreter.get_tensor_details()}[int(pads[0]["outputs"][0])]
    scale, zero = out["quantization"]
    padded = (interpreter.get_tensor(out["index"])[0].astype(np.float64) - zero) * scale
    (top, bottom), (left, right) = stem["padding"]
    assert np.array_equal(padded[top:top + size, left:left + size], values)
    ring = np.ones(padded.shape[:2], bool)
    ring[top:top + size, left:left + size] = False
    assert np.array_equal(padded[ring], np.broadcast_to(stem["pad_pixel"], padded[ring].shape))


def test_the_per_layer_report_names_the_inner_layers(user_model, digits, tmp_path):
    """The per-layer errors (which the float fallback ranks by) name the base network's own layers: through
    ``xedge validate`` for the nested model; for the others, the same comparison on the float .tflite that the
    conversion made (validate converts its Keras reference the same way)."""
    arch = user_model["arch"]
    if arch.inlined:
        result = validate(user_model["keras"], user_model["tflite"], digits["val"], tmp_path / "report", limit=10,
                          layer_samples=2, workers=1)
        assert result.report["layers"]["status"] == "ok", result.report["layers"]
        rows = result.report["layers"]["all"]
    else:
        float_model = user_model["source"].cache.folded.cache.float_tflite
        spec = PreprocessSpec(size=arch.size)
        inputs = [model_input(pixels_for(image, spec), "pixels") for image in sorted(digits["val"].glob("*/*.png"))[:2]]
        rows = [e.to_dict() for e in layer_errors(float_model, user_model["tflite"].read_bytes(), inputs)]
    named = {row["layer"] for row in rows}
    assert {arch.conv, arch.inner} <= named and not named & {*arch.inlined, "fine_tuned"}


def test_the_flat_model_computes_what_the_nested_one_does():
    import keras

    keras.utils.set_random_seed(1)
    nested = _nested_xception()
    flat = flatten(nested)
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    assert {"block1_conv1", "block4_sepconv2"} <= {layer.name for layer in flat.layers}
    x = np.random.default_rng(0).uniform(-1, 1, (2, 71, 71, 3)).astype(np.float32)
    assert np.array_equal(np.asarray(nested(x, training=False)), np.asarray(flat(x, training=False)))


def test_a_tf_keras_flat_model_computes_what_the_nested_one_does():
    """tf_keras configs wire nodes their own way: a nested model's calls are numbered from 1 (its node 0 links its
    own inputs), an op on a tensor is a TFOpLambda node; here the base is called twice, its layers shared."""
    import tf_keras

    base = _tf_keras("nested")().get_layer("base")
    inputs = tf_keras.Input((32, 32, 3))
    twice = base(tf_keras.layers.ReLU(name="again")(inputs * 2.0), training=False)
    x = tf_keras.layers.Add()([base(inputs, training=False), twice])
    nested = tf_keras.Model(inputs, tf_keras.layers.GlobalAveragePooling2D()(x))
    flat = flatten(nested)
    assert not any(isinstance(layer, tf_keras.Model) for layer in flat.layers)
    names = [layer.name for layer in flat.layers]
    assert {"stem_conv", "block1_conv", "again"} <= set(names) and "base" not in names, names
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    assert np.array_equal(np.asarray(nested(x, training=False)), np.asarray(flat(x, training=False)))


@pytest.mark.parametrize("kind", ["same", "zero_padding", "per_channel_normalization"])
def test_a_padded_stem_is_exact_inside_and_off_by_the_border_error_on_the_ring(kind):
    """conv(pad_0(a p + b); w) against the folded conv(pad_c(p); w a) + sum(w b): equal up to float rounding
    inside; on the ring, off by exactly ``border_error`` for each pad; with the correction, equal everywhere.
    The [-1, 1] scaling ('same' or ZeroPadding2D), and a Normalization with a mean per channel (ImageNet's
    kind: a different pad pixel per channel)."""
    import keras

    keras.utils.set_random_seed(2)
    inputs = keras.Input((17, 17, 3))
    x = inputs
    if kind == "per_channel_normalization":
        x = keras.layers.Normalization(mean=[120.3, 110.7, 100.2], variance=[2500.0, 3600.0, 4900.0])(x)
    if kind != "same":
        x = keras.layers.ZeroPadding2D(((1, 2), (2, 1)), name="pad")(x)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same" if kind == "same" else "valid", use_bias=True,
                            bias_initializer="random_normal", name="stem")(x)
    model = keras.Model(inputs, x)
    stem = find_stem(model)
    assert isinstance(stem, Stem) and stem.padded and not stem.exact
    assert stem.domain == ("pixels" if kind == "per_channel_normalization" else "signed_unit")
    p = np.random.default_rng(3).integers(0, 256, (2, 17, 17, 3)).astype(np.uint8)
    normalized = model_input(p, "signed_unit") if stem.domain == "signed_unit" else p.astype(np.float32)
    want = np.asarray(model(normalized), dtype=np.float64)
    w = np.asarray(model.get_layer("stem").get_weights()[0], dtype=np.float64)
    folded_w = w * np.asarray(stem.scale)[None, None, :, None]
    largest = max(1.0, float(np.abs(np.asarray(stem.scale) * 255 + np.asarray(stem.offset)).max()),
                  float(np.abs(stem.offset).max()))
    shift = np.abs(np.einsum("hwio,i->o", w, np.asarray(stem.offset)))
    bound = (w[..., 0].size + 8) * U * (4 * largest * np.abs(w).sum(axis=(0, 1, 2)) + 2 * shift + 1)
    for pad in StemPad:
        expected = 0.0 if pad is StemPad.CORRECTED else border_error(stem, folded_w, (17, 17),
                                                                     stem.pad_pixels(pad), (2, 2))
        assert pad is StemPad.CORRECTED or np.abs(expected).max() > 0
        got = np.asarray(fold_stem(model, stem, pad)(p.astype(np.float32)), dtype=np.float64)
        assert (np.abs(got - want - expected) <= bound).all(), pad
    if kind == "per_channel_normalization":
        assert stem.pad_pixels(StemPad.NEAREST) == (120, 111, 100)


def test_a_keras_3_h5_file_loads_with_keras_3_and_its_base_is_inlined(tmp_path):
    """Keras 3 writes .h5 files too (a transfer-learning model shipped that way, base nested): they load with
    Keras 3, which wrote them, not tf_keras, which cannot read its configs."""
    import keras

    keras.utils.set_random_seed(3)
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(keras.layers.Dropout(0.2)(x)))
    path = tmp_path / "fine_tuned.h5"
    model.save(path)
    source = load_source(path)
    assert source.kind == "keras3" and source.cache.inlined_models == [base.name]
    assert isinstance(find_stem(source.model), Stem) and find_stem(source.model).conv == "Conv1"
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    assert np.array_equal(np.asarray(model(x, training=False)), np.asarray(source.model(x, training=False)))


@pytest.mark.parametrize("kind", ["one_pixel", "per_channel"])
def test_an_int8_padded_stem_stays_in_one_xnnpack_partition_and_pads_with_the_stated_pixels(kind, digits, tmp_path):
    """The explicit pad is PADV2, which XNNPACK leaves to the builtin kernels: it must run before the delegate,
    not cut its graph in two, also when each channel has its own pad pixel (an ImageNet mean per channel:
    three PADV2 and a CONCATENATION); and the padded tensor holds the pixels inside, the pad pixels on the ring."""
    import keras
    from calibrate.dataset import build_calibration_set

    keras.utils.set_random_seed(4)
    inputs = keras.Input((32, 32, 3))
    x = inputs
    if kind == "per_channel":
        x = keras.layers.Normalization(mean=[120.3, 110.7, 100.2], variance=[2500.0, 3600.0, 4900.0])(x)
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False, name="stem")(keras.layers.ZeroPadding2D(1)(x))
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x))
    path = tmp_path / f"{kind}.keras"
    spread_batchnorm(keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))).save(path)
    calibration = build_calibration_set(digits["samples"], PreprocessSpec(size=32), size=16, seed=0)
    result = export_tflite(path, ConvertSettings("int8"), out=tmp_path / "int8.tflite", representative=calibration)
    stem = result.manifest["input_convention"]["stem"]
    want = [120, 111, 100] if kind == "per_channel" else [128] * 3
    assert stem["pad_pixel"] == want
    xnnpack = result.manifest["xnnpack"]
    assert xnnpack["partitions"] == 1, xnnpack
    assert [op["op"] for op in xnnpack["outside"]] == ["PADV2"] * len(set(want)), xnnpack

    values = (np.arange(32 * 32 * 3) % 256).astype(np.uint8).reshape(32, 32, 3)
    interpreter = open_interpreter(result.path.read_bytes(), preserve_all_tensors=True)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], values[None])
    interpreter.invoke()
    ops = interpreter._get_ops_details()
    last = [op for op in ops if op["op_name"] in ("PADV2", "CONCATENATION")][-1]
    out = {d["index"]: d for d in interpreter.get_tensor_details()}[int(last["outputs"][0])]
    scale, zero = out["quantization"]
    padded = (interpreter.get_tensor(out["index"])[0].astype(np.float64) - zero) * scale
    assert np.array_equal(padded[1:33, 1:33], values)
    ring = np.ones(padded.shape[:2], bool)
    ring[1:33, 1:33] = False
    assert np.array_equal(padded[ring], np.broadcast_to(want, padded[ring].shape))
