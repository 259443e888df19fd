"""The predicting phase's lanes: the same report for any number of lanes, and its time apart from the one-time steps.

Each image's outputs depend only on its own pixels (batch-1 interpreters,
one thread each) and are put back in the images' order, so one lane and two
must give the same report figures exactly, with a file that does not decode
among them and more images than two chunks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.preprocessing import PreprocessSpec, model_tensor, pixels_for
from pipeline.validation.lanes import CHUNK
from pipeline.validation.predict import TfliteRunner
from pipeline.validation.validate import validate
from tests.conftest import labeled_subset

PER_CLASS = 15  # 150 images: two full chunks and part of a third
assert 10 * PER_CLASS > 2 * CHUNK


@pytest.fixture(scope="module")
def images(tmp_path_factory, digits) -> Path:
    root = labeled_subset(digits["val"], tmp_path_factory.mktemp("lanes"), PER_CLASS)
    (root / "0" / "0000_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def _figures(report: dict) -> dict:
    """The report without what differs between any two runs (times, the creation date)."""
    figures = {k: v for k, v in report.items() if k not in ("timing", "created")}
    runner = figures["reference_runner"] = dict(report["reference_runner"])
    runner["check"] = {k: v for k, v in runner["check"].items() if k != "seconds"}
    runner.pop("convert_s")
    return figures


@pytest.mark.parametrize("tolerance", [None, 0.0], ids=["tflite_reference", "keras_reference"])
def test_one_lane_and_two_give_the_same_report(tmp_path, trained_run, trained_tflite, images, tolerance):
    extra = {} if tolerance is None else {"reference_tolerance": tolerance}
    one, two = (validate(trained_run.model_path, trained_tflite["int8"], images, tmp_path / str(workers),
                         workers=workers, layer_samples=0, **extra).report for workers in (1, 2))
    assert one["timing"]["workers"] == 1 and two["timing"]["workers"] == 2
    assert one["samples"] == 10 * PER_CLASS and len(one["data"]["skipped"]) == 1
    assert _figures(one) == _figures(two)


def test_images_per_s_covers_the_predicting_phase_alone(tmp_path, trained_run, trained_tflite, images):
    report = validate(trained_run.model_path, trained_tflite["int8"], images, tmp_path, layer_samples=4).report
    timing = report["timing"]
    one_time = timing["one_time"]
    assert set(one_time) == {"load_s", "check_s", "floor_s", "scoring_s"}
    # disjoint spans of one clock: their sum never exceeds the whole (each rounded to 1 ms)
    assert timing["predict_s"] + sum(one_time.values()) <= timing["total_s"] + 0.005
    assert one_time["check_s"] + 0.001 >= report["reference_runner"]["check"]["seconds"]
    assert timing["images_per_s"] == pytest.approx(report["samples"] / timing["predict_s"], rel=0.01)
    assert timing["predict_cpu_s"] >= 0 and timing["workers"] >= 1


def test_one_image_is_a_row_of_the_batch(trained_tflite, images):
    pixels = np.stack([pixels_for(p, PreprocessSpec(size=71)) for p in sorted(images.glob("1/*.png"))[:4]])
    for kind in ("float", "int8"):
        runner = TfliteRunner(trained_tflite[kind], workers=2)
        try:
            batch = runner.predict_pixels(pixels)
            rows = np.stack([runner.predict_one(p) for p in pixels])
        finally:
            runner.close()
        assert runner.per_image and rows.dtype == batch.dtype == np.float32
        np.testing.assert_array_equal(rows, batch)


@pytest.mark.parametrize("convention", ["pixels", "pixels_int8", "signed_unit"])
@pytest.mark.parametrize("dtype,scale,zero_point", [(np.float32, 0.0, 0), (np.uint8, 1.0, 0), (np.int8, 1.0, -128),
                                                    (np.int8, 2 / 255, 0), (np.uint8, 0.0078125, 128)])
def test_an_input_tensor_is_its_pixels_looked_up(convention, dtype, scale, zero_point):
    """The runner's per-image input is a table of the 256 pixel values' tensors, indexed: exact where decoding
    and quantizing are elementwise, which this checks on every pixel value in random positions."""
    pixels = np.random.default_rng(0).permutation(np.arange(256 * 3 * 4) % 256).astype(np.uint8).reshape(32, 32, 3)
    table = model_tensor(np.arange(256, dtype=np.uint8), convention, dtype, scale, zero_point)
    np.testing.assert_array_equal(table[pixels], model_tensor(pixels, convention, dtype, scale, zero_point))
