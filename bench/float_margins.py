"""Whether top-1 agreement on a bench's eval images measures quantization or noise: the float model's top-1
margin on them, and agreement and KL of each int8 method on the images where float has a clear winner.

    python -m bench.float_margins MODEL --calib DIR --eval DIR [--calib-size N] [--out FILE.json]

Every model here reads the same float inputs in [-1, 1] (``signed-unit``,
the convention the conversions below are asked for), each through its own
input quantization. The margin is the float model's softmax probability of
its top class minus that of its second (softmax applied to a logit output
with ``validate``'s rule: rows that are not probabilities are logits); an
image counts as clear at a margin of at least 0.25. Also printed: per op
output, the float tensor's range beside its 99.9th percentile of |x| and the
int8 model's relative RMS error there (error RMS / float std, on the first
100 eval images): where the int8 error starts; and per MUL or ADD with a
constant operand (an unfolded BatchNormalization), how coarse its int8
constant is.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from bench.args import model_and_images
from calibrate.dataset import build_calibration_set
from pipeline.conversion.export import ConvertSettings, export_tflite
from pipeline.core import artifacts
from pipeline.core.preprocessing import PreprocessSpec, dequantize, quantize
from pipeline.model.modelio import load_source
from pipeline.tflite import flatbuffers
from pipeline.tflite.layers import expose_tensors
from pipeline.tflite.runtime import open_interpreter
from pipeline.validation.metrics import kl_rows

CANDIDATES = {
    "int8": ConvertSettings("int8", input_convention="signed_unit", bias_correction=False),
    "int8 bias-correction": ConvertSettings("int8", input_convention="signed_unit", bias_correction=True),
    "int8 mse-ranges": ConvertSettings("int8", input_convention="signed_unit", ranges="mse", bias_correction=False),
    "int16x8": ConvertSettings("int16x8", input_convention="signed_unit"),
}
CLEAR = 0.25


def outputs(model_bytes: bytes, inputs: np.ndarray, tensors: list[int] | None = None) -> dict:
    """Dequantized values of the model's output (key -1) and of ``tensors`` on every input."""
    tensors = tensors or []
    interpreter = open_interpreter(expose_tensors(model_bytes, tensors) if tensors else model_bytes)
    detail, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    quant = {d["index"]: d["quantization"] for d in interpreter.get_tensor_details()}
    found: dict[int, list] = {t: [] for t in [-1, *tensors]}
    for x in inputs:
        interpreter.set_tensor(detail["index"], quantize(x[None], detail["dtype"], *detail["quantization"]))
        interpreter.invoke()
        for t in found:
            index = out["index"] if t == -1 else t
            value = interpreter.get_tensor(index)
            found[t].append(value.astype(np.float64) if value.dtype == np.float32 else dequantize(value, *quant[index]))
    return {t: np.concatenate(v).astype(np.float64) for t, v in found.items()}


def probabilities(y: np.ndarray) -> np.ndarray:
    if np.all(y >= 0) and np.allclose(y.sum(axis=1), 1.0, atol=1e-3):
        return y
    e = np.exp(y - y.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def op_errors(float_model: bytes, int8_model: bytes, inputs: np.ndarray) -> list[dict]:
    """Per op output of the int8 model with a float twin of the same name: ranges and relative RMS error."""
    names = {}
    for model in (float_model, int8_model):
        graph = flatbuffers.read(model).subgraphs[0]
        names[model] = {graph.tensors[int(op.outputs[0])].name.decode(): int(op.outputs[0]) for op in graph.operators}
    shared = [n for n in names[int8_model] if n in names[float_model]]
    f = outputs(float_model, inputs, [names[float_model][n] for n in shared])
    q = outputs(int8_model, inputs, [names[int8_model][n] for n in shared])
    rows = []
    for n in shared:
        a, b = f[names[float_model][n]], q[names[int8_model][n]]
        if a.shape != b.shape or not a.std():
            continue
        rows.append({"tensor": n[:60], "float_min": float(a.min()), "float_max": float(a.max()),
                     "float_p999_abs": float(np.quantile(np.abs(a), 0.999)), "float_std": float(a.std()),
                     "relative_rmse": float(np.sqrt(np.mean((b - a) ** 2)) / a.std())})
    return rows


def constant_levels(int8_model: bytes) -> list[dict]:
    """Per MUL or ADD of the int8 model with a constant operand (an unfolded BatchNormalization): its scales and
    how many of its entries sit within 4 levels of its zero point (a multiplier kept to two or three bits)."""
    model = flatbuffers.read(int8_model)
    graph = model.subgraphs[0]
    found = []
    for index, op in enumerate(graph.operators):
        if flatbuffers.op_name(model, op) not in ("MUL", "ADD"):
            continue
        for t in op.inputs:
            data = model.buffers[graph.tensors[t].buffer].data
            q = graph.tensors[t].quantization
            if data is None or not len(data) or q is None or q.scale is None:
                continue
            values = np.frombuffer(data.tobytes(), np.int8).astype(np.int64) - int(q.zeroPoint[0])
            found.append({"op": index, "kind": flatbuffers.op_name(model, op), "scales": len(q.scale),
                          "scale": float(q.scale[0]), "entries": len(values),
                          "within_4_levels": int(np.sum(np.abs(values) <= 4))})
    return found


def run(model: Path, calib: Path, eval_dir: Path, calib_size: int, work: Path) -> dict:
    source = load_source(model)
    spec = PreprocessSpec(size=source.input_size)
    representative = build_calibration_set(calib, spec, size=calib_size)
    evaluation = build_calibration_set(eval_dir, spec, size=10**6)
    inputs = np.stack([evaluation.inputs(i) for i in range(len(evaluation))]).astype(np.float32)
    exported = export_tflite(model, ConvertSettings("float", input_convention="signed_unit"), out=work / "float.tflite",
                             force=True, source=source)
    float_model = exported.path.read_bytes()
    ref = probabilities(outputs(float_model, inputs)[-1])
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    clear = margin >= CLEAR
    result = {"model": str(model), "samples": len(inputs), "clear_at": CLEAR, "clear": int(clear.sum()),
              "margin_quantiles": {str(q): float(np.quantile(margin, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
              "rows": {}}
    for name, settings in CANDIDATES.items():
        path = work / (name.replace(" ", "_") + ".tflite")
        export_tflite(model, settings, out=path, representative=representative, force=True, source=source)
        cand = probabilities(outputs(path.read_bytes(), inputs)[-1])
        agree, kl = ref.argmax(axis=1) == cand.argmax(axis=1), kl_rows(ref, cand)
        result["rows"][name] = {"agreement": float(agree.mean()), "kl_mean": float(kl.mean()),
                                "agreement_clear": float(agree[clear].mean()), "kl_mean_clear": float(kl[clear].mean())}
    result["int8_constants"] = constant_levels((work / "int8.tflite").read_bytes())
    result["int8_op_errors"] = op_errors(float_model, (work / "int8.tflite").read_bytes(), inputs[:100])
    return result


def main(argv=None) -> None:
    parser = model_and_images("python -m bench.float_margins", __doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="float-margins-") as work:
        result = run(args.model, args.calib, args.eval_dir, args.calib_size, Path(work))
    print(json.dumps({k: v for k, v in result.items() if k not in ("int8_op_errors", "int8_constants")}, indent=1))
    for row in result["int8_constants"]:
        print(f"op {row['op']} {row['kind']} constant: {row['scales']} scale(s), {row['scale']:.4f}; "
              f"{row['within_4_levels']} of {row['entries']} entries within 4 levels of zero")
    for row in result["int8_op_errors"]:
        print(f"{row['tensor']:60s} [{row['float_min']:8.2f}, {row['float_max']:8.2f}] p99.9 {row['float_p999_abs']:7.2f} "
              f"std {row['float_std']:7.3f} rel rmse {row['relative_rmse']:.3f}")
    if args.out:
        artifacts.atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
