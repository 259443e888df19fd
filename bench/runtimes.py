"""The same float/int8 pair under every TFLite runtime at hand, through the device runner.

    python -m bench.runtimes demo-out/model_float.tflite demo-out/model_int8.tflite --threads 2 --json r.json

Runtimes: this venv's ``ai_edge_litert`` and ``tensorflow.lite``, and
tflite-runtime 2.14 from ``.cache/tflite-runtime-2.14`` (the venv the tests
create) when it exists. Each run is ``devices.bench.compare`` on a local
profile with that runtime, so A/B runs alternate in one fresh process and the
int8/float figure is the median of per-pair ratios; the notes are the ones
``xedge bench --compare`` prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TFLITE_RUNTIME_PYTHON = ROOT / ".cache" / "tflite-runtime-2.14" / "bin" / "python"


def main(argv=None) -> None:
    from devices.bench import compare
    from devices.profile import DeviceProfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("float_model")
    p.add_argument("int8_model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    setups = [("ai_edge_litert", sys.executable), ("tensorflow", sys.executable)]
    if TFLITE_RUNTIME_PYTHON.exists():
        setups.append(("tflite_runtime", str(TFLITE_RUNTIME_PYTHON)))
    rows = []
    for runtime, python in setups:
        profile = DeviceProfile(name=f"local-{runtime}", python=python, runtime=runtime, threads=args.threads,
                                runs=args.runs, warmup=args.warmup)
        result = compare(args.float_model, args.int8_model, profile)
        flt, q = result["results"]
        rows.append({"runtime": flt["runtime"], "threads": args.threads, "runs": args.runs,
                     "float_p50_ms": flt["latency_ms"]["p50"], "int8_p50_ms": q["latency_ms"]["p50"],
                     "int8_over_float_p50": result["compare"]["ratio_b_over_a"]["p50"],
                     "int8_delegate_partitions": q["ops"].get("delegate_partitions"), "notes": result["notes"],
                     "machine": flt["machine"]})
        print(f"{flt['runtime']['name']:>15} {flt['runtime']['version']:>8}: float p50 "
              f"{rows[-1]['float_p50_ms']:8.3f} ms, int8 p50 {rows[-1]['int8_p50_ms']:8.3f} ms, "
              f"int8/float {rows[-1]['int8_over_float_p50']:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
