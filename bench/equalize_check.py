"""What cross-layer equalization does to one model's float outputs and to the activations between its pairs.

    python -m bench.equalize_check MODEL --calib DIR [--calib-size N]

On the float model the staged int8 route quantizes (scales folded) and on
its equalization (``pipeline.tflite.equalize``), over the first N
calibration images in the model's own input convention: the largest
difference of the outputs (the rewrite is exact up to float32 rounding),
and per equalized pair (named by its first layer) how much of the middle tensor's range its median
channel spans (its largest |value| over the tensor's) before and after,
since int8 gives that tensor one scale for all channels. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from calibrate.dataset import build_calibration_set
from pipeline.conversion import routes
from pipeline.conversion.settings import ConvertSettings
from pipeline.core.preprocessing import PreprocessSpec
from pipeline.model.modelio import load_source
from pipeline.tflite import flatbuffers
from pipeline.tflite.equalize import SUFFIX, equalize
from pipeline.tflite.layers import expose_tensors, layer_names, primary_layer
from pipeline.tflite.runtime import open_interpreter


def _run(model: bytes, inputs: list[np.ndarray], tensors: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The outputs, and each tensor's largest |value| per channel over the inputs."""
    interpreter = open_interpreter(expose_tensors(model, tensors))
    detail, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs, peaks = [], [np.zeros(1)] * len(tensors)
    for x in inputs:
        interpreter.set_tensor(detail["index"], x.astype(detail["dtype"]))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out["index"]).copy())
        for i, t in enumerate(tensors):
            v = np.abs(interpreter.get_tensor(t))
            peaks[i] = np.maximum(peaks[i], v.reshape(-1, v.shape[-1]).max(axis=0))
    return np.concatenate(outputs), peaks


def check(model: Path, calib: Path, size: int) -> dict:
    source = load_source(model)
    settings, _ = routes.resolved(source, ConvertSettings("int8"))
    convention = settings.decided_convention
    folded = routes.int8_float_model(routes.converted_source(source, convention), settings)
    equalized, report = equalize(folded)
    samples = build_calibration_set(calib, PreprocessSpec(size=source.input_size), size=size)
    inputs = [batch[0] for batch in routes.representative_in(samples, convention).batches()]
    names = [t.name.decode() for t in flatbuffers.read(equalized).subgraphs[0].tensors]
    after_tensors = [i for i, name in enumerate(names) if name.endswith(SUFFIX)]
    before_names = [t.name.decode() for t in flatbuffers.read(folded).subgraphs[0].tensors]
    before_tensors = [before_names.index(names[i][:-len(SUFFIX)]) for i in after_tensors]
    y0, before = _run(folded, inputs, before_tensors)
    y1, after = _run(equalized, inputs, after_tensors)
    pairs = [{"layer": primary_layer(names[t], layer_names(names[t])),
              "median_channel_share_before": round(float(np.median(b / b.max())), 3),
              "median_channel_share_after": round(float(np.median(a / a.max())), 3)}
             for t, b, a in zip(after_tensors, before, after)]
    return {"model": str(model), "input_convention": str(convention), "samples": len(inputs), "equalized": len(report.pairs),
            "largest_output": float(np.abs(y0).max()), "largest_difference": float(np.abs(y1 - y0).max()),
            "pairs": pairs}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.equalize_check", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--calib-size", type=int, default=50)
    args = parser.parse_args(argv)
    print(json.dumps(check(args.model, args.calib, args.calib_size), indent=1))


if __name__ == "__main__":
    main()
