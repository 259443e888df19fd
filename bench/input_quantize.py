"""What the uint8 -> int8 QUANTIZE of a pixel input costs where XNNPACK leaves it outside the delegate.

    python -m bench.input_quantize --size 299 --runs 300

Two int8 models of one 1x1 convolution on a size x size x 3 input, identical
but for their I/O: uint8 pixels (``--input-convention pixels``: a QUANTIZE to
int8 first, run by the builtin kernel) and int8 p - 128 (``pixels-int8``: no
QUANTIZE). The runner alternates them in one process; the p50 difference is
the op's cost, to set against a whole model's latency.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline.conversion.converter_hooks import fast_minmax, pin_input_range, quantize_calibrated, quantizer_route
from pipeline.core.tf_logs import import_tensorflow_quietly
from pipeline.tflite.rewrites import xnnpack_report

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.input_quantize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=299)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    tf = import_tensorflow_quietly()
    inputs = tf.keras.Input((args.size, args.size, 3), batch_size=1)
    x = tf.keras.layers.GlobalAveragePooling2D()(tf.keras.layers.Conv2D(8, 1)(inputs))
    float_model = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inputs, x)).convert()
    rng = np.random.default_rng(0)
    samples = [[rng.integers(0, 256, (1, args.size, args.size, 3)).astype(np.float32)] for _ in range(4)]
    calibrated = pin_input_range(fast_minmax(float_model, samples)[0], 0.0, 255.0)
    with tempfile.TemporaryDirectory(prefix="xedge-quantize-") as tmp:
        paths = {}
        for name, io in (("pixels_int8", "int8"), ("pixels", "uint8")):
            paths[name] = Path(tmp) / f"{name}.tflite"
            paths[name].write_bytes(quantize_calibrated(calibrated, route=quantizer_route(), io=io, per_channel=True))
        outside = {name: xnnpack_report(path.read_bytes())["outside"] for name, path in paths.items()}
        proc = subprocess.run([sys.executable, str(ROOT / "devices" / "runner.py"), str(paths["pixels_int8"]),
                               str(paths["pixels"]), "--runs", str(args.runs), "--warmup", "20", "--threads",
                               str(args.threads)], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    p50 = {r["model"]["name"]: r["latency_ms"]["p50"] for r in result["results"]}
    print(json.dumps({"size": args.size, "threads": args.threads, "runs": args.runs, "p50_ms": p50,
                      "quantize_op_ms": round(p50["pixels"] - p50["pixels_int8"], 4),
                      "ratio_p50": result["compare"]["ratio_b_over_a"]["p50"],
                      "outside_xnnpack": {k: [e["op"] for e in v] for k, v in outside.items()},
                      "cpu": result["results"][0]["machine"]["cpu"]}))


if __name__ == "__main__":
    main()
