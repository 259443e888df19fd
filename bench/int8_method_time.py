"""What the int8 methods cost beside plain calibration, side by side in one process: medians of repeated runs.

    python -m bench.int8_method_time MODEL --calib DIR [--calib-size N] [--repeats 3] [--rows A,B] [--out FILE.json]

Each repeat converts MODEL to int8 once per row, every row from a fresh
calibration (the calibration ``export_tflite`` keeps between conversions of
one loaded source is dropped first), the rows taking turns so that a load
change on the machine hits every row alike. Per row: the calibration's own
seconds (min/max over the calibration images, plus the range search for
``mse`` ranges), the methods' seconds (bias correction and/or learned
rounding on their images), their sum (the calibration stage of ``convert
--int8``) and the whole conversion; the float conversion is done once, before
the first repeat, and is in no row.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from bench import machine
from bench.args import model_and_images
from calibrate.dataset import build_calibration_set
from pipeline.conversion.export import ConvertSettings, export_tflite, float_tflite
from pipeline.core import artifacts
from pipeline.core.preprocessing import PreprocessSpec
from pipeline.model.modelio import load_source

ROWS = {
    "plain (min/max ranges; nearest rounding; no methods)": {"bias_correction": False},
    "bias correction (the default)": {},
    "mse ranges": {"ranges": "mse", "bias_correction": False},
    "mse ranges + bias correction": {"ranges": "mse", "bias_correction": True},
    "mse ranges + learned rounding + bias correction": {"ranges": "mse", "rounding": "learned",
                                                        "bias_correction": True},
}


def _forget_calibration(source, seen: set | None = None) -> None:
    """Drop the calibration kept by the source and by the sources it refers to (a folded input convention)."""
    seen = seen if seen is not None else set()
    seen.add(id(source))
    source.cache.calibrated = None
    for value in (source.cache.folded, source.cache.unfolded):
        if value is not None and id(value) not in seen:
            _forget_calibration(value, seen)


def _once(model: Path, source, representative, overrides: dict, out: Path) -> dict:
    _forget_calibration(source)
    exported = export_tflite(model, ConvertSettings("int8", **overrides), out=out, representative=representative,
                             force=True, source=source)
    calibration = exported.manifest["calibration"]["method"] or {}
    methods = calibration.get("int8_methods") or {}
    seconds = {"calibration_s": calibration["seconds"], "methods_s": methods.get("seconds", 0.0)}
    seconds["stage_s"] = seconds["calibration_s"] + seconds["methods_s"]
    seconds["convert_s"] = exported.manifest["timing"]["total_s"]
    return seconds


def run(model: Path, calib: Path, calib_size: int, repeats: int, work: Path, rows_wanted: list[str] | None = None) -> dict:
    load = machine.load_average()
    source = load_source(model)
    representative = build_calibration_set(calib, PreprocessSpec(size=source.input_size), size=calib_size)
    float_tflite(source)
    chosen = {name: overrides for name, overrides in ROWS.items() if not rows_wanted or name in rows_wanted}
    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    for _ in range(repeats):
        for name, overrides in chosen.items():
            runs[name].append(_once(model, source, representative, overrides, work / "candidate.tflite"))
    rows = {name: {key: statistics.median(r[key] for r in found) for key in found[0]} | {"runs": found}
            for name, found in runs.items()}
    plain = rows["plain (min/max ranges; nearest rounding; no methods)"]["stage_s"]
    for row in rows.values():
        row["stage_vs_plain"] = round(row["stage_s"] / plain, 2)
    return {"model": str(model), "sha256": artifacts.sha256_any(model), "calib_size": len(representative),
            "repeats": repeats, "rows": rows, "machine": machine.describe(load)}


def table(result: dict) -> str:
    lines = ["| int8 calibration | calibration s | methods s | stage s | x plain | convert s |",
             "|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['calibration_s']:.2f} | {r['methods_s']:.2f} | {r['stage_s']:.2f} | "
                     f"{r['stage_vs_plain']:.2f} | {r['convert_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = model_and_images("python -m bench.int8_method_time", __doc__.splitlines()[0], eval_dir=False)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rows", help="Only these rows, comma-separated (default: all; the first row is the "
                        "plain one every ratio is taken against).")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="int8-time-") as work:
        result = run(args.model, args.calib, args.calib_size, args.repeats, Path(work),
                     args.rows.split(",") if args.rows else None)
    print(table(result))
    print(json.dumps(result["machine"].get("cpu_model")))
    if args.out:
        artifacts.atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
