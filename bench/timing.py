"""Latency, measured side by side: models take turns so drift on a noisy machine hits all alike."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import manifest_path_for
from pipeline.core.preprocessing import model_tensor, scale
from pipeline.tflite.input_convention import file_convention


# The stages of a conversion in the manifest's ``timing`` that make the model (docs/converting.md, "The manifest").
CONVERSION_STAGES = ("convert_s", "calibration_s", "quantizer_s")


def manifest_stages(model_path: str | Path) -> dict:
    """The stage timings ``convert`` wrote in the manifest beside ``model_path`` (``timing``; {} without one), so a
    bench run records, next to its wall time, which stage the time went to."""
    try:
        return dict(json.loads(manifest_path_for(Path(model_path)).read_text()).get("timing") or {})
    except (OSError, ValueError):
        return {}


def conversion_s(timing: dict) -> float:
    """Seconds spent making the model (the float conversion, calibration and quantizer), from a manifest's timing."""
    return round(sum(timing.get(stage, 0.0) for stage in CONVERSION_STAGES), 3)


class LiteRT:
    """A .tflite fed decoded pixels in its own input convention (``pipeline.tflite.input_convention``)."""

    def __init__(self, path, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.name = str(path)
        self.data = open(path, "rb").read()
        self.convention = file_convention(path, self.data)[0]
        self.interpreter = Interpreter(model_content=self.data, num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]

    def feed(self, pixels: np.ndarray) -> None:
        self.interpreter.set_tensor(self.input["index"], model_tensor(pixels[None], self.convention,
                                                                      self.input["dtype"], *self.input["quantization"]))

    def run(self) -> None:
        self.interpreter.invoke()


class OnnxRuntime:
    def __init__(self, path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.feed_dict = None

    def feed(self, pixels: np.ndarray) -> None:
        self.feed_dict = {self.input_name: scale(pixels[None])}  # the ONNX export takes [-1, 1]

    def run(self) -> None:
        self.session.run(None, self.feed_dict)


def alternate(runners: dict, inputs: np.ndarray, *, rounds: int = 10, per_round: int = 5, warmup: int = 3) -> dict:
    """Median and spread per model; each round runs every model ``per_round`` times, in turn."""
    times = {name: [] for name in runners}
    for name, r in runners.items():
        r.feed(inputs[0])
        for _ in range(warmup):
            r.run()
    for k in range(rounds):
        x = inputs[k % len(inputs)]
        for name, r in runners.items():
            r.feed(x)
            for _ in range(per_round):
                t = time.perf_counter()
                r.run()
                times[name].append((time.perf_counter() - t) * 1000)
    return {name: {"p50_ms": round(float(np.median(v)), 2), "p90_ms": round(float(np.percentile(v, 90)), 2),
                   "runs": len(v)} for name, v in times.items()}
