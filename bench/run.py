"""One bench run, side by side on the same model and images; writes JSON and prints a table.

    python -m bench                      # Xception-299, 100 calibration photos, 2 threads
    python -m bench --size 71 --width 0.25 --images 20 --skip-peer   # a quick smoke run

Measured: (1) int8 conversion wall time and peak memory, TensorFlow's
converter as users call it by hand vs ``convert --int8`` from the Keras
model and from its float .tflite (the analogue of the peer's ONNX file); (2) LiteRT p50 of
float32, stock int8 and our int8 (pixel input, the default; and [-1, 1] input,
``convert --input-convention signed-unit``, timed side by side), with XNNPACK
partition counts; (3) the peer,
ONNX Runtime's quantize_static on the same model and images, and its p50;
(4) ``xedge validate`` throughput; (5) ``xedge demo`` end to end. Latencies
alternate between models (medians of interleaved rounds); inputs are real
photos decoded through the one preprocessing definition (each model fed its
own input convention), never zeros.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.machine import describe, load_average
from bench.images import write_photo_crops
from bench.measure import run_with_peak
from bench.timing import LiteRT, OnnxRuntime, alternate, manifest_stages

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _child_env(threads: int) -> dict:
    # the project first; a PYTHONPATH the caller set (the bench extra installed with pip --target) stays after it
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return env


def _model(cache: Path, size: int, width: float, middle: int) -> Path:
    path = cache / f"xception_{size}_{width}_{middle}.keras"
    if not path.exists():
        import keras

        from pipeline.model.xception import build_xception

        keras.utils.set_random_seed(0)
        build_xception(size, 1000, width, middle).save(path)
    return path


def _fidelity(model_path: Path, val_dir: Path, candidates: dict) -> dict:
    """Each integer model against its float Keras model on labeled held-out images."""
    import keras

    from pipeline.core.data import discover
    from pipeline.core.preprocessing import PreprocessSpec, pixels_for, scale

    model = keras.saving.load_model(model_path, compile=False)
    found = discover(val_dir)
    spec = PreprocessSpec(int(model.inputs[0].shape[1]))
    pixels = np.stack([pixels_for(i.path, spec) for i in found.items])
    x = scale(pixels)
    labels = np.asarray([found.classes.index(i.label) for i in found.items])
    reference = np.concatenate([np.asarray(model(x[i:i + 64], training=False)) for i in range(0, len(x), 64)])
    out = {"images": int(len(x)), "top1_float": float(np.mean(reference.argmax(-1) == labels))}
    for name, predict in candidates.items():
        got = np.stack([predict(p) for p in pixels])
        out[name] = {"top1": float(np.mean(got.argmax(-1) == labels)),
                     "top1_agreement_with_float": float(np.mean(got.argmax(-1) == reference.argmax(-1))),
                     "mean_abs_error": float(np.abs(got - reference).mean())}
    return out


def _tflite_predict(path: Path):
    from pipeline.core.preprocessing import dequantize

    runner = LiteRT(path, 2)
    o = runner.interpreter.get_output_details()[0]

    def predict(pixels):
        runner.feed(pixels)
        runner.run()
        return dequantize(runner.interpreter.get_tensor(o["index"]), *o["quantization"])[0]

    return predict


def _parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=299)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--middle-blocks", type=int, default=8)
    ap.add_argument("--images", type=int, default=100, help="calibration images")
    ap.add_argument("--eval-images", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=1, help="conversions per method (alternating)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    return ap.parse_args(argv)


@dataclass
class _Run:
    """What the steps of one bench run share: options, child environment, scratch folder, model and photos."""

    args: argparse.Namespace
    env: dict
    work: Path
    model: Path
    calib: Path
    evals: Path
    inputs: np.ndarray

    @property
    def float_tfl(self) -> Path:
        return self.work / "float.tflite"

    @property
    def stock_tfl(self) -> Path:
        return self.work / "stock_int8.tflite"

    @property
    def ours_tfl(self) -> Path:
        return self.work / "ours_int8.tflite"

    @property
    def signed_tfl(self) -> Path:
        return self.work / "signed_unit_int8.tflite"

    @property
    def from_tfl(self) -> Path:
        return self.work / "from_float_int8.tflite"

    @property
    def onnx_f(self) -> Path:
        return self.work / "model.onnx"

    @property
    def onnx_q(self) -> Path:
        return self.work / "model_qdq.onnx"


def main(argv=None) -> None:
    args = _parse_args(argv)

    from pipeline.core.tf_logs import import_tensorflow_quietly

    load_at_start = load_average()
    import_tensorflow_quietly()
    cache = ROOT / ".cache" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="xedge-bench-"))
    env = _child_env(args.threads)
    results: dict = {"config": vars(args) | {"out": str(args.out)}, "machine": describe(load_at_start)}
    try:
        run = _prepare(args, cache, work, env)
        _conversions(run, results)
        peer = results["peer_onnxruntime"] = _peer(run)
        latency = results["latency"] = _latency(run, peer)
        results["ratios"] = _ratios(results["conversion"], latency, peer)
        results["op_profile"] = _op_profile(run)
        results["ratios"]["xedge_int8_over_gemm_floor"] = results["op_profile"]["over_floor"]
        results["validate"] = _validate(run)
        if not args.skip_demo:
            _demo_and_fidelity(run, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results["machine"] = describe(load_at_start)  # again, for the load average at the end
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    _print_table(results)
    print(f"wrote {args.out}")


def _checked(cmd: list[str], env: dict) -> dict:
    """``cmd`` run and measured; a failed step stops the bench with the end of its stderr."""
    result = run_with_peak(cmd, env=env, cwd=ROOT)
    assert result["returncode"] == 0, result["stderr"][-2000:]
    return result


def _prepare(args, cache: Path, work: Path, env: dict) -> _Run:
    """The model (cached), the calibration and evaluation photos, and the evaluation inputs."""
    model = _model(cache, args.size, args.width, args.middle_blocks)
    calib = write_photo_crops(cache / f"calib_{args.images}", args.images, seed=1)
    evals = write_photo_crops(cache / f"eval_{args.eval_images}", args.eval_images, seed=2)
    from pipeline.core.preprocessing import PreprocessSpec, pixels_for

    spec = PreprocessSpec(args.size)
    inputs = np.stack([pixels_for(p, spec) for p in sorted(evals.glob("*.jpg"))])  # decoded pixels
    print(f"model {model.name}, {args.images} calibration photos, {len(inputs)} eval photos", flush=True)
    return _Run(args, env, work, model, calib, evals, inputs)


def _conversions(run: _Run, results: dict) -> None:
    """(1) int8 conversions, alternating A/B: TF by hand, ``convert --int8`` from Keras and from float .tflite."""
    args, model, calib = run.args, run.model, run.calib
    # The float .tflite is to our int8 step what the ONNX export is to quantize_static: made beforehand.
    _checked([str(BIN / "convert"), str(model), "--float", "--out", str(run.float_tfl), "--force"], run.env)
    methods = (  # key, label, command, the output whose manifest has the stage timings (None: no manifest)
        ("tf_by_hand", "TF by hand",
         [sys.executable, "-m", "bench.stock_convert", str(model), str(calib), str(run.stock_tfl), str(args.images)],
         None),
        ("xedge_convert", "convert --int8",
         [str(BIN / "convert"), str(model), "--int8", "--calib", str(calib), "--calib-size", str(args.images),
          "--out", str(run.ours_tfl), "--force", "--json"], run.ours_tfl),
        ("xedge_convert_from_tflite", "convert float.tflite --int8",
         [str(BIN / "convert"), str(run.float_tfl), "--int8", "--calib", str(calib), "--calib-size", str(args.images),
          "--out", str(run.from_tfl), "--force", "--json"], run.from_tfl),
    )
    conv: dict = {key: [] for key, _, _, _ in methods}
    for _ in range(args.repeat):
        for key, label, cmd, output in methods:
            r = _checked(cmd, run.env)
            stages = manifest_stages(output) if output is not None else {}
            conv[key].append({"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
                              **({"stages": stages} if stages else {})})
            print(f"  {label}: {r['wall_s']} s, {r['peak_rss_mib']} MiB"
                  + (f" ({_stage_line(stages)})" if stages else ""), flush=True)
    results["conversion"] = {k: {"wall_s_median": float(np.median([r["wall_s"] for r in v])),
                                 "peak_rss_mib_max": max(r["peak_rss_mib"] for r in v),
                                 **_stage_medians(v), "runs": v}
                             for k, v in conv.items()}
    manifest = json.loads((run.work / "ours_int8.manifest.json").read_text())
    results["xedge_manifest"] = {"calibration_method": manifest["calibration"]["method"],
                                 "optimizations": [{k: e.get(k) for k in ("name", "count", "applied",
                                                                           "delegate_partitions", "check")}
                                                   for e in manifest["optimizations"]],
                                 "timing": manifest["timing"]}
    results["same_bytes_from_tflite_and_keras"] = run.from_tfl.read_bytes() == run.ours_tfl.read_bytes()
    # The [-1, 1] int8 input of before input conventions, for the latency of the pixel input against it.
    _checked([str(BIN / "convert"), str(model), "--int8", "--calib", str(calib), "--calib-size", str(args.images),
              "--input-convention", "signed-unit", "--out", str(run.signed_tfl), "--force", "--json"], run.env)


def _stage_medians(runs: list[dict]) -> dict:
    """``stages_median``: each stage's median over the runs that recorded stage timings ({} when none did)."""
    recorded = [r["stages"] for r in runs if r.get("stages")]
    if not recorded:
        return {}
    return {"stages_median": {k: round(float(np.median([s.get(k, 0.0) for s in recorded])), 3) for k in recorded[0]}}


def _stage_line(stages: dict) -> str:
    """The stages that took time, as ``name s``, largest first; the process's start-up is the wall time's rest."""
    taken = sorted(((k[:-2], v) for k, v in stages.items() if k != "total_s" and v >= 0.05), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in taken) + f"; total {stages.get('total_s')} s"


def _peer(run: _Run) -> dict:
    """(3) the peer: ONNX export, then ONNX Runtime's quantize_static on the same photos ({} when skipped)."""
    if run.args.skip_peer:
        return {}
    e = _checked([sys.executable, "-m", "bench.peer_onnx", "export", str(run.model), str(run.onnx_f)], run.env)
    q = _checked([sys.executable, "-m", "bench.peer_onnx", "quantize", str(run.onnx_f), str(run.onnx_q),
                  str(run.calib), str(run.args.images)], run.env)
    peer = {"export_s": json.loads(e["stdout"].strip().splitlines()[-1])["export_s"],
            "quantize_static_s": json.loads(q["stdout"].strip().splitlines()[-1])["quantize_s"],
            "quantize_wall_s": q["wall_s"], "quantize_peak_rss_mib": q["peak_rss_mib"]}
    print(f"  ONNX Runtime quantize_static: {peer['quantize_static_s']} s", flush=True)
    return peer


def _latency(run: _Run, peer: dict) -> dict:
    """(2) p50 latency of every model, alternating, with the XNNPACK partitions of the LiteRT ones."""
    from pipeline.tflite.rewrites import delegate_partitions

    threads = run.args.threads
    litert = {"litert_float32": run.float_tfl, "litert_int8_stock": run.stock_tfl, "litert_int8_xedge": run.ours_tfl,
              "litert_int8_xedge_signed_unit": run.signed_tfl}
    runners = {name: LiteRT(path, threads) for name, path in litert.items()}
    if peer:
        runners["ort_float32"] = OnnxRuntime(run.onnx_f, threads)
        runners["ort_int8_qdq"] = OnnxRuntime(run.onnx_q, threads)
    latency = alternate(runners, run.inputs, rounds=run.args.rounds)
    for name, path in litert.items():
        latency[name]["xnnpack_partitions"] = delegate_partitions(path.read_bytes(), threads)
    return latency


def _ratios(conversion: dict, latency: dict, peer: dict) -> dict:
    """The headline ratios: int8 over float32 latency, our conversion time over the others'."""
    f32 = latency["litert_float32"]["p50_ms"]
    ratios = {"xedge_int8_over_float32": round(latency["litert_int8_xedge"]["p50_ms"] / f32, 3),
              "pixel_int8_over_signed_unit_int8": round(latency["litert_int8_xedge"]["p50_ms"]
                                                        / latency["litert_int8_xedge_signed_unit"]["p50_ms"], 3),
              "stock_int8_over_float32": round(latency["litert_int8_stock"]["p50_ms"] / f32, 3),
              "xedge_convert_over_tf_by_hand": round(
                  conversion["xedge_convert"]["wall_s_median"] / conversion["tf_by_hand"]["wall_s_median"], 3)}
    if peer:
        from_wall = conversion["xedge_convert_from_tflite"]["wall_s_median"]
        ratios["xedge_from_tflite_wall_over_peer_quantize_wall"] = round(from_wall / peer["quantize_wall_s"], 3)
        ratios["xedge_from_tflite_wall_over_peer_quantize_static_in_process"] = round(
            from_wall / peer["quantize_static_s"], 3)
        ratios["xedge_convert_wall_over_peer_quantize"] = round(
            conversion["xedge_convert"]["wall_s_median"] / peer["quantize_static_s"], 3)
        ratios["xedge_convert_wall_over_peer_export_plus_quantize"] = round(
            conversion["xedge_convert"]["wall_s_median"] / (peer["export_s"] + peer["quantize_wall_s"]), 3)
        ratios["ort_int8_over_float32"] = round(latency["ort_int8_qdq"]["p50_ms"] / latency["ort_float32"]["p50_ms"], 3)
    return ratios


def _validate(run: _Run) -> dict:
    """(4) ``xedge validate`` throughput on the bench model (photos, agreement only: the model is untrained)."""
    work = run.work
    eval_dir = work / "eval"
    shutil.copytree(run.evals, eval_dir)
    v = run_with_peak([str(BIN / "xedge"), "validate", str(run.float_tfl), str(run.ours_tfl), "--data", str(eval_dir),
                       "--report", str(work / "report")], env=run.env, cwd=ROOT)
    report = work / "report" / "report.json"
    timing = json.loads(report.read_text()).get("timing", {}) if report.exists() else {}
    return {"wall_s": v["wall_s"], "returncode": v["returncode"], "peak_rss_mib": v["peak_rss_mib"], **timing}


def _demo_and_fidelity(run: _Run, results: dict) -> None:
    """(5) ``xedge demo`` end to end, then (6) fidelity on its trained model: stock int8 vs ``convert --int8``."""
    work = run.work
    d = run_with_peak([str(BIN / "xedge"), "demo", "--out", str(work / "demo")], env=run.env, cwd=ROOT)
    results["demo"] = {"wall_s": d["wall_s"], "returncode": d["returncode"]}
    demo = work / "demo"
    if d["returncode"] != 0:
        return
    stock_demo = work / "demo_stock_int8.tflite"
    _checked([sys.executable, "-m", "bench.stock_convert", str(demo / "run" / "model.keras"),
              str(demo / "data" / "samples"), str(stock_demo), "100"], run.env)
    results["fidelity_trained_digits"] = _fidelity(
        demo / "run" / "model.keras", demo / "data" / "val",
        {"litert_int8_stock": _tflite_predict(stock_demo),
         "litert_int8_xedge": _tflite_predict(demo / "model_int8.tflite")})


def _op_profile(run: _Run) -> dict:
    """Where the int8 model's time goes per op type, and its p50 against the int8 GEMM floor
    (``bench.op_profile``, in a fresh process)."""
    out = run.work / "op_profile.json"
    _checked([str(BIN / "python"), "-m", "bench.op_profile", str(run.ours_tfl), "--threads", str(run.args.threads),
              "--out", str(out)], run.env)
    found = json.loads(out.read_text())
    found.pop("ops", None)  # per op: in the tool's own output, not the bench's
    return found


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="bench (medians)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    c = r["conversion"]
    t.add_row("int8 conversion, TF by hand", f"{c['tf_by_hand']['wall_s_median']:.1f} s, "
                                             f"{c['tf_by_hand']['peak_rss_mib_max']:.0f} MiB")
    t.add_row("int8 conversion, convert --int8", f"{c['xedge_convert']['wall_s_median']:.1f} s, "
                                                 f"{c['xedge_convert']['peak_rss_mib_max']:.0f} MiB")
    t.add_row("int8 conversion, convert float.tflite --int8",
              f"{c['xedge_convert_from_tflite']['wall_s_median']:.1f} s, "
              f"{c['xedge_convert_from_tflite']['peak_rss_mib_max']:.0f} MiB")
    if r.get("peer_onnxruntime"):
        p = r["peer_onnxruntime"]
        t.add_row("peer tf2onnx export", f"{p['export_s']:.1f} s")
        t.add_row("peer quantize_static", f"{p['quantize_static_s']:.1f} s in process, {p['quantize_wall_s']:.1f} s "
                  f"wall, {p['quantize_peak_rss_mib']:.0f} MiB")
    for name, v in r["latency"].items():
        extra = f", {v['xnnpack_partitions']} XNNPACK partitions" if "xnnpack_partitions" in v else ""
        t.add_row(f"p50 {name}", f"{v['p50_ms']:.2f} ms{extra}")
    for name, v in r["ratios"].items():
        t.add_row(name, f"{v:.3f}")
    profile = r.get("op_profile")
    if profile:
        t.add_row("int8 GEMM floor", f"{profile['floor_ms']:.2f} ms ({profile['gemm']['gmac_per_s']} GMAC/s)")
        for name, v in list(profile["by_type"].items())[:4]:
            t.add_row(f"int8 ops alone: {name}", f"{v['ms']:.2f} ms ({v['share']:.0%})")
    fid = r.get("fidelity_trained_digits")
    if fid:
        t.add_row("trained digits: top-1 float", f"{fid['top1_float']:.4f} ({fid['images']} images)")
        for name in ("litert_int8_stock", "litert_int8_xedge"):
            t.add_row(f"trained digits: top-1 {name}", f"{fid[name]['top1']:.4f}, agreement "
                      f"{fid[name]['top1_agreement_with_float']:.4f}, MAE {fid[name]['mean_abs_error']:.2e}")
    if "validate" in r:
        t.add_row(f"xedge validate ({r['config']['size']} px, both models)", f"{r['validate'].get('images_per_s')} images/s predict, "
                  f"{r['validate']['wall_s']:.0f} s wall, {r['validate']['peak_rss_mib']:.0f} MiB")
    if "demo" in r:
        t.add_row("xedge demo", f"{r['demo']['wall_s']:.0f} s")
    Console().print(t)


if __name__ == "__main__":
    main()
