"""How close each int8 method stays to the float model: TensorFlow's converter as documented, ONNX Runtime's
quantize_static, this project's int8 with and without learned rounding and bias correction, and int16x8/dynamic
for scale.

    python -m bench.int8_methods MODEL --calib DIR --eval DIR [--calib-size N] [--limit N] [--rows A,B]
                                 [--no-onnx] [--out FILE.json]

Each row is validated against MODEL (the Keras source) with ``validate`` on
the same eval images: top-1 agreement, flips, mean KL and, for an eval
folder with class subfolders, top-1. Calibration time: the TF converter's
whole child process (load, convert) for its row; for this project's rows the
conversion time from the manifest (float conversion, calibration,
quantizer; the float conversion and a min/max calibration are done once and
reused by the later rows), the calibration's own seconds (min/max, plus the
range search for ``--ranges mse``) and the methods' seconds. Run the TF row on a --calib folder
holding exactly --calib-size images so that both calibrate on the same ones.

ONNX Runtime's row (``bench.peer_onnx`` in child processes; needs the
``bench`` extra: tf2onnx, onnx, onnxruntime) calibrates on the first
--calib-size files of --calib in name order and is compared with its own
unquantized ONNX export on the eval images (agreement, flips, mean KL); a
missing package or a failed export is recorded as the row's error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import machine
from bench.args import model_and_images
from bench.timing import conversion_s
from calibrate.dataset import build_calibration_set
from pipeline.conversion.export import ConvertSettings, export_tflite
from pipeline.core import artifacts
from pipeline.core.preprocessing import PreprocessSpec, preprocess_file
from pipeline.model.modelio import load_source
from pipeline.validation.metrics import kl_rows
from pipeline.validation.validate import validate

ROWS = {  # every setting spelled out, whatever ConvertSettings' defaults are, but the first row's
    "int8 default": {},  # convert --int8 as it is: bias correction, its float means from the calibration pass
    "int8 default + CLE": {"equalize": True},  # the default on the float model with its layer pairs equalized
    "int8": {"bias_correction": False},
    "int8 bias-correction": {"bias_correction": True},
    "int8 learned-rounding": {"rounding": "learned", "bias_correction": False},
    "int8 learned + bias-correction": {"rounding": "learned", "bias_correction": True},
    "int8 mse-ranges": {"ranges": "mse", "bias_correction": False},
    "int8 mse-ranges + bias-correction": {"ranges": "mse", "bias_correction": True},
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


def _peer(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.peer_onnx", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench.peer_onnx {args[0]} failed: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _onnx_outputs(path: Path, files: list[Path], size: int) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    spec = PreprocessSpec(size)
    return np.concatenate([session.run(None, {name: preprocess_file(f, spec)[None].astype(np.float32)})[0]
                           for f in files]).astype(np.float64)


def _as_probabilities(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as probabilities, decided once from the float side (as ``validate`` decides from the model):
    rows that already are probabilities stay (the quantized side renormalized), logits get a softmax."""
    if np.all(ref >= 0) and np.allclose(ref.sum(axis=1), 1.0, atol=1e-3):
        cand = np.clip(cand, 0.0, None)
        return ref, cand / np.maximum(cand.sum(axis=1, keepdims=True), 1e-12)

    def softmax(y):
        e = np.exp(y - y.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return softmax(ref), softmax(cand)


def _onnx_row(model: Path, calib: Path, eval_dir: Path, calib_size: int, limit: int | None, size: int,
              work: Path) -> dict:
    """ONNX Runtime's quantize_static (``bench.peer_onnx``: tf2onnx, QDQ, per-channel int8 weights, uint8
    activations, MinMax on the first ``calib_size`` calibration files) against the unquantized ONNX model of the
    same export on the eval images: agreement, flips and mean KL (no top-1: the ONNX model has no labels)."""
    fp32, quantized = work / "peer.onnx", work / "peer_int8.onnx"
    export = _peer(["export", str(model), str(fp32)])
    quant = _peer(["quantize", str(fp32), str(quantized), str(calib), str(calib_size)])
    files = sorted(f for f in eval_dir.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    ref, cand = _as_probabilities(_onnx_outputs(fp32, files, size), _onnx_outputs(quantized, files, size))
    agree = ref.argmax(axis=1) == cand.argmax(axis=1)
    return {"agreement": float(agree.mean()), "flips": int((~agree).sum()), "kl_mean": float(kl_rows(ref, cand).mean()),
            "top1": None, "top1_float": None, "samples": len(files), "convert_s": export["export_s"] + quant["quantize_s"],
            "calibration_s": quant["quantize_s"], "reference": "the unquantized ONNX export"}


def run(model: Path, calib: Path, eval_dir: Path, calib_size: int, limit: int | None, work: Path,
        onnx: bool = True, rows_wanted: list[str] | None = None) -> dict:
    load = machine.load_average()
    source = load_source(model)
    representative = build_calibration_set(calib, PreprocessSpec(size=source.input_size), size=calib_size)
    rows = {}
    stock = work / "tf_converter.tflite"
    seconds = _stock(model, calib, stock, calib_size)
    rows["TF converter (documented)"] = {**_measure(model, stock, eval_dir, limit, work), "convert_s": seconds}
    for name, overrides in ROWS.items():
        if rows_wanted and name not in rows_wanted:
            continue
        path = work / (name.replace(" ", "_").replace("+", "and") + ".tflite")
        exported = export_tflite(model, ConvertSettings("int8", **overrides), out=path, representative=representative,
                                 force=True, source=source)
        methods = (exported.manifest["calibration"]["method"] or {}).get("int8_methods") or {}
        calibration = exported.manifest["calibration"]["method"] or {}
        timing = exported.manifest["timing"]
        rows[name] = {**_measure(model, path, eval_dir, limit, work), "convert_s": conversion_s(timing),
                      "calibration_s": calibration.get("seconds"), "methods_s": methods.get("seconds", 0.0),
                      "methods_samples": methods.get("samples"), "stages": timing,
                      "equalize": calibration.get("equalize")}
    if onnx:
        try:
            rows["ONNX Runtime quantize_static"] = _onnx_row(model, calib, eval_dir, calib_size, limit,
                                                             source.input_size, work)
        except (ImportError, RuntimeError) as exc:  # the bench extra is not installed, or the export failed
            rows["ONNX Runtime quantize_static"] = {"error": str(exc)[-500:]}
    for name, settings in SCALE_ROWS.items():
        path = work / f"{name}.tflite"
        exported = export_tflite(model, settings, out=path, force=True, source=source,
                                 representative=representative if settings.mode == "int16x8" else None)
        timing = exported.manifest["timing"]
        rows[name] = {**_measure(model, path, eval_dir, limit, work), "convert_s": conversion_s(timing),
                      "stages": timing}
    return {"model": str(model), "sha256": artifacts.sha256_any(model), "calib": str(calib), "calib_size": len(representative),
            "eval": str(eval_dir), "rows": rows, "machine": machine.describe(load)}


def table(result: dict) -> str:
    lines = ["| conversion | agreement | flips | KL mean | top-1 | convert s | calibration s | methods s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} |||||||")
            continue
        top1 = "n/a" if r["top1"] is None else f"{r['top1']:.4f}"
        calibration = "n/a" if r.get("calibration_s") is None else f"{r['calibration_s']:.2f}"
        lines.append(f"| {name} | {r['agreement']:.4f} | {r['flips']} | {r['kl_mean']:.5f} | {top1} | "
                     f"{r['convert_s']:.2f} | {calibration} | {r.get('methods_s', 0.0):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = model_and_images("python -m bench.int8_methods", __doc__.splitlines()[0])
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-onnx", action="store_true", help="Leave out ONNX Runtime's row (bench extra).")
    parser.add_argument("--rows", help="Only these of this project's int8 rows, comma-separated (default: all).")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="int8-methods-") as work:
        result = run(args.model, args.calib, args.eval_dir, args.calib_size, args.limit, Path(work),
                     onnx=not args.no_onnx, rows_wanted=args.rows.split(",") if args.rows else None)
    print(table(result))
    if args.out:
        artifacts.atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
