"""Every manifest says where its conversion's time went, stage by stage, adding up to its total.

Only the accounting is checked (which stages are there, that none is
negative, that they add up, that the total fits inside the call): how long a
stage takes depends on the machine and belongs to ``bench/``.
"""

from __future__ import annotations

import time

import pytest

from pipeline.conversion.export import ConvertSettings, export_tflite
from pipeline.model.modelio import load_source

STAGES = ("load", "probe", "convert", "calibration", "quantizer", "methods", "rewrites", "search", "metadata", "write")
# Each stage and the total are rounded to the millisecond on their own: 11 roundings of at most 0.5 ms.
ROUNDING_S = 11 * 0.0005 + 1e-9


def _timed_export(*args, **kwargs) -> tuple[dict, float]:
    started = time.perf_counter()
    result = export_tflite(*args, **kwargs)
    return result.manifest["timing"], time.perf_counter() - started


def _check_adds_up(timing: dict, wall_s: float) -> None:
    assert set(timing) == {f"{stage}_s" for stage in STAGES} | {"total_s"}
    assert all(isinstance(value, float) and value >= 0 for value in timing.values()), timing
    stages = sum(timing[f"{stage}_s"] for stage in STAGES)
    assert abs(stages - timing["total_s"]) <= ROUNDING_S, timing
    assert timing["total_s"] <= wall_s + 0.0005, (timing, wall_s)  # measured inside the call


# One mode per route the clock takes (pipeline/conversion/routes.py): float stands for the converter's one call
# without calibration images (dynamic and fp16 differ only in the converter's options, set inside the same
# "convert" stage), int16x8 for one call that calibrates inside it, int8 for the staged calibration and quantizer.
# dynamic goes through the same route below, with a model loaded before the call.
@pytest.mark.parametrize("mode", ["float", "int8", "int16x8"])
def test_every_stage_is_timed_and_they_add_up_to_the_total(mode, tiny_keras_path, calibration, tmp_path):
    representative = calibration if mode in ("int8", "int16x8") else None
    timing, wall_s = _timed_export(tiny_keras_path, ConvertSettings(mode), out=tmp_path / f"{mode}.tflite",
                                   representative=representative)
    _check_adds_up(timing, wall_s)
    assert timing["search_s"] == 0.0  # no accuracy search ran
    if representative is None:  # nothing calibrated or quantized apart from the converter's one call
        assert timing["calibration_s"] == 0.0 and timing["quantizer_s"] == 0.0
    # bias correction (the default where --int8 calibrates on images) is its own stage; the one-call routes have none
    assert (timing["methods_s"] > 0) == (mode == "int8")


def test_a_model_loaded_before_the_call_counts_its_load_once(tiny_keras_path, tmp_path):
    """The CLI loads the model before converting it (to size the calibration images): the load is still timed."""
    source = load_source(tiny_keras_path)
    loaded_s = source.cache.load_s
    first = export_tflite(tiny_keras_path, ConvertSettings("float"), out=tmp_path / "a.tflite", source=source)
    timing = first.manifest["timing"]
    assert timing["load_s"] >= round(loaded_s, 3) - 0.0005 and timing["total_s"] >= timing["load_s"]
    assert abs(sum(timing[f"{stage}_s"] for stage in STAGES) - timing["total_s"]) <= ROUNDING_S, timing
    timing, wall_s = _timed_export(tiny_keras_path, ConvertSettings("dynamic"), out=tmp_path / "b.tflite",
                                   source=source)
    _check_adds_up(timing, wall_s)  # not loaded again: nothing before the call is counted


def test_a_tflite_source_has_its_probe_and_stages_timed(tiny_keras_path, calibration, tmp_path):
    float_path = export_tflite(tiny_keras_path, ConvertSettings("float"), out=tmp_path / "float.tflite").path
    for mode, representative in (("float", None), ("int8", calibration)):
        timing, wall_s = _timed_export(float_path, ConvertSettings(mode), out=tmp_path / f"from_tflite_{mode}.tflite",
                                       representative=representative)
        _check_adds_up(timing, wall_s)
        if mode == "float":  # its own bytes: the converter never ran
            assert timing["calibration_s"] == timing["quantizer_s"] == 0.0
