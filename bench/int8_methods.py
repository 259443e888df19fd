"""How close each int8 method stays to the float model: TensorFlow's converter as documented, this project's
int8 with and without learned rounding and bias correction, and int16x8/dynamic for scale.

    python -m bench.int8_methods MODEL --calib DIR --eval DIR [--calib-size N] [--limit N] [--out FILE.json]

Each row is validated against MODEL (the Keras source) with ``validate`` on
the same eval images: top-1 agreement, flips, mean KL and, for an eval
folder with class subfolders, top-1. Calibration time: the TF converter's
whole child process (load, convert) for its row; for this project's rows the
conversion time from the manifest (float conversion, calibration,
quantizer; the float conversion and a min/max calibration are done once and
reused by the later rows), the calibration's own seconds (min/max, plus the
range search for ``--ranges mse``) and the methods' seconds. Run the TF row on a --calib folder
holding exactly --calib-size images so that both calibrate on the same ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import machine
from bench.timing import conversion_s
from calibrate.dataset import build_calibration_set
from pipeline.conversion.export import ConvertSettings, export_tflite
from pipeline.core import artifacts
from pipeline.core.preprocessing import PreprocessSpec
from pipeline.model.modelio import load_source
from pipeline.validation.validate import validate

ROWS = {
    "int8": {},
    "int8 bias-correction": {"bias_correction": True},
    "int8 learned-rounding": {"rounding": "learned"},
    "int8 learned + bias-correction": {"rounding": "learned", "bias_correction": True},
    "int8 mse-ranges": {"ranges": "mse"},
    "int8 mse-ranges + learned + bias-correction": {"ranges": "mse", "rounding": "learned", "bias_correction": True},
}
SCALE_ROWS = {"int16x8": ConvertSettings("int16x8"), "dynamic": ConvertSettings("dynamic")}


def _stock(model: Path, calib: Path, out: Path, count: int) -> float:
    """TensorFlow's converter as its docs show (``bench.stock_convert``, a child process); its seconds."""
    done = subprocess.run([sys.executable, "-m", "bench.stock_convert", str(model), str(calib), str(out), str(count)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench.stock_convert failed: {done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _measure(model: Path, candidate: Path, eval_dir: Path, limit: int | None, work: Path) -> dict:
    report = validate(model, candidate, eval_dir, work / candidate.stem, limit=limit, layer_samples=0).report
    return {"agreement": report["agreement"], "flips": report["flips_total"], "kl_mean": report["kl_mean"],
            "top1": report["top1_quant"], "top1_float": report["top1_float"], "samples": report["samples"]}


def run(model: Path, calib: Path, eval_dir: Path, calib_size: int, limit: int | None, work: Path) -> dict:
    load = machine.load_average()
    source = load_source(model)
    representative = build_calibration_set(calib, PreprocessSpec(size=source.input_size), size=calib_size)
    rows = {}
    stock = work / "tf_converter.tflite"
    seconds = _stock(model, calib, stock, calib_size)
    rows["TF converter (documented)"] = {**_measure(model, stock, eval_dir, limit, work), "convert_s": seconds}
    for name, overrides in ROWS.items():
        path = work / (name.replace(" ", "_").replace("+", "and") + ".tflite")
        exported = export_tflite(model, ConvertSettings("int8", **overrides), out=path, representative=representative,
                                 force=True, source=source)
        methods = (exported.manifest["calibration"]["method"] or {}).get("int8_methods") or {}
        calibration = exported.manifest["calibration"]["method"] or {}
        timing = exported.manifest["timing"]
        rows[name] = {**_measure(model, path, eval_dir, limit, work), "convert_s": conversion_s(timing),
                      "calibration_s": calibration.get("seconds"), "methods_s": methods.get("seconds", 0.0),
                      "methods_samples": methods.get("samples"), "stages": timing}
    for name, settings in SCALE_ROWS.items():
        path = work / f"{name}.tflite"
        exported = export_tflite(model, settings, out=path, force=True, source=source,
                                 representative=representative if settings.mode == "int16x8" else None)
        timing = exported.manifest["timing"]
        rows[name] = {**_measure(model, path, eval_dir, limit, work), "convert_s": conversion_s(timing), "stages": timing}
    return {"model": str(model), "sha256": artifacts.sha256_any(model), "calib": str(calib), "calib_size": len(representative),
            "eval": str(eval_dir), "rows": rows, "machine": machine.describe(load)}


def table(result: dict) -> str:
    lines = ["| conversion | agreement | flips | KL mean | top-1 | convert s | calibration s | methods s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        top1 = "n/a" if r["top1"] is None else f"{r['top1']:.4f}"
        calibration = "n/a" if r.get("calibration_s") is None else f"{r['calibration_s']:.2f}"
        lines.append(f"| {name} | {r['agreement']:.4f} | {r['flips']} | {r['kl_mean']:.5f} | {top1} | "
                     f"{r['convert_s']:.2f} | {calibration} | {r.get('methods_s', 0.0):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_methods", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--eval", dest="eval_dir", type=Path, required=True)
    parser.add_argument("--calib-size", type=int, default=200)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="int8-methods-") as work:
        result = run(args.model, args.calib, args.eval_dir, args.calib_size, args.limit, Path(work))
    print(table(result))
    if args.out:
        artifacts.atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
