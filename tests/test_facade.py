"""The library's entry points as a Python user calls them: ``from pipeline import ...`` (the README's Python section).

``import pipeline`` itself loads no stage (every ``import pipeline.x`` runs it first); each entry point is the
library's own function, loaded on first use.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


def test_import_pipeline_loads_nothing_heavy():
    code = ("import sys, pipeline; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('numpy', 'tensorflow', 'keras', 'ai_edge_litert') or m.startswith('pipeline.')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    assert proc.stdout.strip() == "[]"


def test_the_entry_points_are_the_library_functions():
    import pipeline
    from pipeline.conversion.export import export_tflite
    from pipeline.model.train import train
    from pipeline.validation.parity import run_parity
    from pipeline.validation.validate import validate

    assert (pipeline.convert, pipeline.train, pipeline.validate, pipeline.parity) == (export_tflite, train, validate,
                                                                                      run_parity)
    assert sorted(pipeline.__all__) == sorted(["Budgets", "ConvertSettings", "PreprocessSpec", "Tolerance",
                                               "TrainConfig", "convert", "parity", "train", "validate"])
    assert all(getattr(pipeline, name) is not None for name in pipeline.__all__)


def test_the_readme_imports_what_pipeline_exports():
    import pipeline

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    names = re.search(r"^from pipeline import (.+)$", block, re.M).group(1).split(", ")
    assert set(names) <= set(pipeline.__all__) and {"convert", "validate", "parity", "train"} <= set(names)


@pytest.mark.slow
def test_train_convert_validate_parity_from_python(tmp_path):
    """The four calls of the README, in order, on a tiny model trained one epoch on 200 digits."""
    from calibrate.dataset import build_calibration_set
    from devices.parity_target import device_target
    from pipeline import (Budgets, ConvertSettings, PreprocessSpec, Tolerance, TrainConfig, convert, parity, train,
                          validate)
    from pipeline.core.digits import write_digits

    data = write_digits(tmp_path / "digits", limit=200, samples=32)
    run = train(data["train"], tmp_path / "run", TrainConfig(epochs=1, input_size=71, width=0.25, middle_blocks=1),
                val_dir=data["val"])
    assert run.model_path.exists() and len(run.history) == 1

    calibration = build_calibration_set(data["samples"], PreprocessSpec(size=71), size=32)
    float_model = convert(run.model_path, ConvertSettings("float"), out=tmp_path / "float.tflite")
    int8 = convert(run.model_path, ConvertSettings("int8"), representative=calibration, out=tmp_path / "int8.tflite")
    assert int8.manifest["settings"]["mode"] == "int8" and int8.manifest_path.exists()
    assert int8.manifest["calibration"]["count"] == 32

    drift = validate(run.model_path, int8.path, data["val"], tmp_path / "report", budgets=Budgets(), limit=20,
                     layer_samples=0)
    assert drift.report["samples"] == 20 and drift.passed and drift.paths["json"].exists()
    assert 0.0 <= drift.report["agreement"] <= 1.0

    same = parity(float_model.path, data["val"], [device_target("local")], limit=6, tolerance=Tolerance())
    [target] = same.report["targets"]
    assert target["name"] == "device local" and target["images"] == 6 and len(target["rows"]) == 6
    assert target["top1_matches"] + target["top1_mismatches"] == 6 and np.isfinite(target["max_diff"])
    assert same.passed == (target["top1_mismatches"] == 0)  # no tolerance given: only a changed top-1 fails


def test_renamed_modules_keep_their_old_import_paths():
    """Seven modules were renamed (docs/development.md); code written against the old paths still runs."""
    import importlib

    for old, new, name in [("pipeline.tflite.tflite_info", "pipeline.tflite.contents", "inspect_tflite"),
                           ("pipeline.tflite.tflite_metadata", "pipeline.tflite.metadata", "read_metadata"),
                           ("pipeline.tflite.tflite_optimize", "pipeline.tflite.rewrites", "xnnpack_report"),
                           ("pipeline.tflite.safe_tflite", "pipeline.tflite.sandboxed_load", "probe"),
                           ("pipeline.model.loop", "pipeline.model.steps", "Steps"),
                           ("pipeline.core.quiet", "pipeline.core.tf_logs", "native_stderr_captured"),
                           ("devices.transport", "devices.transport_base", "BenchRequest")]:
        assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)
