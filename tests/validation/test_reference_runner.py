"""Which runner computes a validation's reference, the check that decides it, and the machine's floor.

A Keras reference runs as its float32 .tflite only where the two agree on the
run's own images; the check covers every image of these runs (16, the check's
sample), so when it passes both runners give the same top-1 on every image and
the report's agreement and flips are the same numbers exactly.
"""

from __future__ import annotations

import pytest

from pipeline.core.errors import ConversionError, ValidationError
from pipeline.validation.accuracy_budget import BudgetSettings
from pipeline.validation.reference import KERAS_RUNNER, REFERENCE_CHECK_SAMPLES, REFERENCE_TOLERANCE, TFLITE_RUNNER
from pipeline.validation.validate import validate

IMAGES = 16
assert IMAGES <= REFERENCE_CHECK_SAMPLES  # the check sees every image of these runs


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory, trained_run, trained_tflite, digits):
    """The same Keras-vs-int8 validation, once as chosen by the check and once with the check forced to fail."""
    out = tmp_path_factory.mktemp("reference_runner")
    run = dict(limit=IMAGES, layer_samples=4)
    chosen = validate(trained_run.model_path, trained_tflite["int8"], digits["val"], out / "chosen", **run)
    keras = validate(trained_run.model_path, trained_tflite["int8"], digits["val"], out / "keras",
                     reference_tolerance=0.0, **run)
    return chosen, keras


def test_keras_reference_runs_as_its_float_tflite_where_the_check_passes(two_reports):
    result, _ = two_reports
    r = result.report
    runner = r["reference_runner"]
    check = runner["check"]
    assert runner["runner"] == TFLITE_RUNNER and check["passed"] is True
    assert check["samples"] == IMAGES == r["samples"] and check["top1_equal"] == IMAGES
    assert check["tolerance"] == REFERENCE_TOLERANCE and 0 <= check["max_abs_diff"] < REFERENCE_TOLERANCE
    assert runner["convert_s"] > 0
    assert r["layers"]["status"] == "ok" and "in memory" in r["layers"]["float_model"]
    assert r["reference"]["kind"] != "tflite"  # the report still describes the reference model itself
    assert f"reference runner | {TFLITE_RUNNER}" in result.paths["md"].read_text()


def test_failed_check_keeps_the_keras_reference_and_says_why(two_reports):
    result = two_reports[1]
    runner = result.report["reference_runner"]
    assert runner["runner"] == KERAS_RUNNER and runner["check"]["passed"] is False
    assert runner["check"]["tolerance"] == 0.0 and runner["check"]["samples"] == IMAGES
    assert "the reference model runs" in runner["reason"]
    assert "the reference model runs" in result.paths["md"].read_text()


def test_report_numbers_do_not_depend_on_the_runner_when_the_check_passes(two_reports):
    a, b = (result.report for result in two_reports)
    assert a["reference_runner"]["runner"] != b["reference_runner"]["runner"]
    assert a["reference_runner"]["check"]["top1_equal"] == a["samples"]  # so every top-1 is the same
    for key in ("samples", "agreement", "flips_total", "flips", "top1_float", "top1_quant", "top1_drop_pp",
                "top1_drop_ci95_pp", "mcnemar", "confusion_change"):
        assert a[key] == b[key], key


def test_throughput_is_reported_beside_the_machines_floor(two_reports):
    timing = two_reports[0].report["timing"]
    floor = timing["floor"]
    assert floor["samples"] == 8 and floor["cores"] >= 1
    assert min(floor["decode_ms"], floor["reference_ms"], floor["candidate_ms"]) > 0
    per_image = floor["decode_ms"] + floor["reference_ms"] + floor["candidate_ms"]
    assert floor["images_per_s"] == pytest.approx(floor["cores"] * 1000 / per_image, rel=1e-2)
    assert floor["of_floor"] == pytest.approx(timing["images_per_s"] / floor["images_per_s"], rel=2e-2)


def test_a_tflite_reference_runs_as_it_is(tmp_path, trained_tflite, digits):
    r = validate(trained_tflite["float"], trained_tflite["int8"], digits["val"], tmp_path, limit=10,
                 layer_samples=0).report
    assert r["reference_runner"]["runner"] == "the reference .tflite" and r["reference_runner"]["convert_s"] is None
    assert r["reference_runner"]["check"]["passed"] is None and r["reference_runner"]["check"]["samples"] == 0
    with pytest.raises(ValidationError) as caught:
        validate(trained_tflite["float"], trained_tflite["int8"], digits["val"], tmp_path, reference_tolerance=-1)
    assert caught.value.setting == "reference_tolerance"


@pytest.mark.parametrize("kwargs,setting", [({"max_drop_pp": -0.5}, "max_drop_pp"),
                                            ({"max_drop_pp": float("nan")}, "max_drop_pp"),
                                            ({"candidates": 0}, "candidates"),
                                            ({"max_float_layers": -1}, "max_float_layers"),
                                            ({"layer_samples": 0}, "layer_samples"),
                                            ({"eval_limit": 0}, "eval_limit")])
def test_budget_settings_check_themselves(tmp_path, kwargs, setting):
    with pytest.raises(ConversionError) as caught:
        BudgetSettings(**{"max_drop_pp": 1.0, "eval_dir": tmp_path, **kwargs})
    assert caught.value.setting == setting and "--" not in str(caught.value)
    assert BudgetSettings(1.0, tmp_path).to_manifest() == {"budget_top1_drop_pp": 1.0, "max_float_layers": 8,
                                                           "eval": {"folder": str(tmp_path), "limit": None}}
