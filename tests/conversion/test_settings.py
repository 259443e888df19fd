"""The conversion settings check themselves: every combination the CLI refuses is refused by the library alone,
as a SettingsError naming the setting at fault, so a Python caller meets the same rules."""

from __future__ import annotations

import json

import pytest

from pipeline.conversion.settings import (Calibrator, ConvertRequest, ConvertSettings, Fallback, Mode, Ranges,
                                          Rounding)
from pipeline.core.conventions import InputConvention
from pipeline.core.errors import ConversionError, Remedy, SettingsError


@pytest.mark.parametrize("kwargs, setting", [
    (dict(mode="fp16", float_io=True), "float_io"),
    (dict(mode="dynamic", rounding="learned"), "rounding"),
    (dict(mode="int16x8", ranges="mse"), "ranges"),
    (dict(mode="float", bias_correction=True), "bias_correction"),
    (dict(mode="fp16", float_layers=("a",)), "float_layers"),
    (dict(mode="int16x8", fallback="int16"), "fallback"),
    (dict(mode="int8", float_io=True, input_convention="pixels_int8"), "input_convention"),
    (dict(mode="fp16", input_convention="pixels-int8"), "input_convention"),
    (dict(mode="int4"), "mode"),
    (dict(mode="int8", calibrator="slow"), "calibrator"),
    (dict(mode="int8", fallback="int4"), "fallback"),
    (dict(mode="int8", input_convention="rgb"), "input_convention"),
])
def test_settings_refuse_what_cannot_go_together(kwargs, setting):
    with pytest.raises(SettingsError) as caught:
        ConvertSettings(**kwargs)
    assert caught.value.setting == setting
    assert "--" not in str(caught.value)  # the library names no flag; the CLI adds it
    assert isinstance(caught.value, ConversionError)  # callers that caught ConversionError still do


def test_no_mode_is_a_usage_error_with_its_remedy():
    with pytest.raises(SettingsError) as caught:
        ConvertSettings(None)  # type: ignore[arg-type]
    assert caught.value.remedy == Remedy.MODE


@pytest.mark.parametrize("settings, kwargs, setting", [
    (dict(mode="fp16"), dict(calib="d"), "calib"),
    (dict(mode="int8"), dict(max_drop_pp=1.0), "eval_dir"),
    (dict(mode="int8"), dict(eval_dir="d"), "max_drop_pp"),
    (dict(mode="int8"), dict(labels="l.json"), "labels"),
    (dict(mode="fp16"), dict(max_drop_pp=1.0, eval_dir="d"), "max_drop_pp"),
    (dict(mode="int8", fallback="int16"), dict(), "fallback"),
    (dict(mode="int16x8", input_convention="pixels"), dict(calib="d"), "input_convention"),
])
def test_a_request_refuses_what_cannot_go_together(settings, kwargs, setting):
    with pytest.raises(SettingsError) as caught:
        ConvertRequest(ConvertSettings(**settings), **kwargs)
    assert caught.value.setting == setting
    assert "--" not in str(caught.value)


def test_good_requests_pass():
    ConvertRequest(ConvertSettings("int8", fallback="int16"), calib="d", max_drop_pp=0.5, eval_dir="e",
                   labels="l.json")
    ConvertRequest(ConvertSettings("int16x8", float_io=True, input_convention="pixels"), calib="d")
    ConvertRequest(ConvertSettings("float"))


def test_settings_normalize_to_their_enums_and_write_plain_strings():
    settings = ConvertSettings("int8", calibrator="stock", fallback="int16", input_convention="pixels-int8",
                               rounding="learned", ranges="mse")
    assert (settings.mode, settings.calibrator, settings.fallback) == (Mode.INT8, Calibrator.STOCK, Fallback.INT16)
    assert (settings.rounding, settings.ranges) == (Rounding.LEARNED, Ranges.MSE)
    assert settings.input_convention is InputConvention.PIXELS_INT8
    assert settings.mode == "int8" and settings.input_convention == "pixels_int8"  # strings still compare equal
    written = settings.to_dict()
    assert written["input_convention"] == "pixels_int8" and type(written["mode"]) is str
    assert json.loads(json.dumps(written))["calibrator"] == "stock"


@pytest.mark.parametrize("path, mode, budget, needs", [
    ("m.tflite", "int8", False, False),
    ("m.TFLITE", "int8", False, False),
    ("m.tflite", "int8", True, True),
    ("m.tflite", "int16x8", False, True),
    ("m.keras", "int8", False, True),
    ("saved_model", "float", False, True),
])
def test_which_conversions_need_tensorflow(path, mode, budget, needs):
    request = ConvertRequest(ConvertSettings(mode), max_drop_pp=1.0 if budget else None,
                             eval_dir="e" if budget else None)
    assert request.needs_tensorflow(path) is needs
