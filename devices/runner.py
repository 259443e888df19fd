#!/usr/bin/env python3
"""Time a .tflite model on the machine this file runs on, and print one JSON object.

This file is copied to the device (a Raspberry Pi, an ARM board, a phone with
Python), so it needs only the standard library, numpy and one TFLite
interpreter: ``ai_edge_litert``, else ``tflite_runtime`` (still what many
boards have; 2.14 needs numpy<2), else ``tensorflow.lite``. It imports
nothing from xception-edge and stays Python 3.7 compatible.

Why it is done this way:

* the model is read as bytes, its flatbuffer identifier checked, and handed
  over as ``model_content``: a path would be mapped by the interpreter without
  any check, and a truncated or foreign file can crash it natively;
* inputs are real samples (a uint8 ``.npy`` batch of decoded pixels; or a
  float32 one of the model's own float input values, or integers already in
  its input type, both set as they are apart from the model's own
  quantization: what ``xedge parity`` sends) or random pixels; never zeros,
  which some kernels run faster than real data. Pixels are fed as the
  model's input convention says (``--input-convention``, which the host reads with
  ``pipeline.tflite.input_convention``; else its input tensor: uint8 at
  scale 1 takes the pixels, int8 at scale 1 and zero point -128 takes
  p - 128, other integer inputs p / 127.5 - 1 quantized; else a manifest
  beside the model; else [-1, 1]), mirroring ``pipeline.core.preprocessing``
  (``model_input``, then ``quantize`` with the model's own scale and zero
  point);
* only ``invoke()`` is timed; inputs are set between runs, outside the clock;
* with two models, runs alternate A, B, A, B... in one process and each pair
  gives a ratio, so a comparison survives a noisy machine (a background job
  slows both members of a pair, not one model's whole series).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import stat
import sys
import time

import numpy as np

SCHEMA = 1
MAX_MODEL_BYTES = 2 * 1024 ** 3
RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")
RANDOM_SAMPLES = 8
CONVENTIONS = ("pixels", "pixels_int8", "signed_unit")  # pipeline.core.preprocessing.INPUT_CONVENTIONS
MAX_MANIFEST_BYTES = 16 * 2**20  # pipeline.core.manifest_schema.MAX_MANIFEST_BYTES
PIXEL_TENSORS = {("uint8", 1.0, 0): "pixels", ("int8", 1.0, -128): "pixels_int8"}


class RunnerError(Exception):
    """A problem the user can fix (bad model file, missing runtime, bad inputs)."""


def load_runtime(preferred="auto"):
    """Return (Interpreter class, OpResolverType or None, name, version)."""
    order = RUNTIMES if preferred == "auto" else (preferred,)
    if preferred != "auto" and preferred not in RUNTIMES:
        raise RunnerError("unknown runtime %r; choose one of auto, %s" % (preferred, ", ".join(RUNTIMES)))
    problems = []
    for name in order:
        try:
            if name == "ai_edge_litert":
                import ai_edge_litert as pkg
                from ai_edge_litert import interpreter as mod
                resolver = getattr(mod, "OpResolverType", None)
            elif name == "tflite_runtime":
                import tflite_runtime as pkg
                from tflite_runtime import interpreter as mod
                resolver = getattr(mod, "OpResolverType", None)
            else:
                import tensorflow as pkg
                mod = pkg.lite
                resolver = getattr(pkg.lite.experimental, "OpResolverType", None)
        except ImportError as exc:  # includes numpy ABI mismatches, which raise ImportError too
            problems.append("%s: %s" % (name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            continue
        version = getattr(pkg, "__version__", None) or _dist_version(name)
        return mod.Interpreter, resolver, name, version
    raise RunnerError("no TFLite interpreter could be imported (" + "; ".join(problems) + "); install "
                      "ai-edge-litert, or tflite-runtime (with numpy<2 for 2.14)")


def _dist_version(name):
    try:
        from importlib import metadata
    except ImportError:  # Python 3.7
        return None
    for dist in (name.replace("_", "-"), name):
        try:
            return metadata.version(dist)
        except Exception:  # PackageNotFoundError, or a broken metadata folder on a board
            continue
    return None


def read_model(path):
    """Model bytes, checked to be a TFLite flatbuffer before any interpreter sees them."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise RunnerError("cannot read model %s: %s" % (path, exc.strerror or exc))
    if size > MAX_MODEL_BYTES:
        raise RunnerError("model %s is %d bytes, over the %d limit" % (path, size, MAX_MODEL_BYTES))
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise RunnerError("%s is not a TFLite model (no TFL3 flatbuffer identifier)" % path)
    return data


def cpu_description():
    """A human description of the CPU: x86 'model name', or ARM 'Hardware'/'Model'/implementer+part."""
    info = {}  # type: dict[str, str]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, _, value = line.partition(":")
                    info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    for key in ("model name", "Model", "Hardware", "Processor", "cpu model"):
        if info.get(key):
            return info[key]
    if info.get("CPU implementer"):
        return "implementer %s part %s" % (info.get("CPU implementer"), info.get("CPU part", "?"))
    return platform.processor() or platform.machine()


def machine_info():
    return {"machine": platform.machine(), "system": platform.system(), "release": platform.release(),
            "cpu": cpu_description(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "hostname": platform.node()}


def peak_rss_mb():
    """Peak resident memory of this process since it started.

    /proc's VmHWM first: getrusage's ru_maxrss survives execve on Linux, so a
    runner started from a big parent (TensorFlow loaded) would report the
    parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return round(peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0, 1)


def quantize(x, dtype, scale, zero_point):
    """Float model input -> the model's integer input; mirrors pipeline.core.preprocessing.quantize."""

    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.asarray(x).astype(dtype)
    if not scale:
        raise RunnerError("a quantized input needs a non-zero scale")
    info = np.iinfo(dtype)
    # As TFLite's QUANTIZE op: float32 division, halves rounded to even.
    q = np.round(np.asarray(x, dtype=np.float32) / np.float32(scale)).astype(np.int64) + int(zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def model_input(pixels, convention):
    """Decoded pixels -> the float value the model takes; mirrors pipeline.core.preprocessing.model_input."""
    x = np.asarray(pixels, dtype=np.float32)
    if convention == "signed_unit":
        return x / np.float32(127.5) - np.float32(1.0)
    return x


def manifest_convention(path):
    """The input convention the manifest beside the model records (none recorded: [-1, 1]), or None."""
    base = os.path.splitext(path)[0] if path.endswith(".tflite") else path
    try:  # only a regular file of sane size: a FIFO would block, /dev/zero would never end
        fd = os.open(base + ".manifest.json", os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        manifest = json.loads(raw) if len(raw) <= MAX_MANIFEST_BYTES else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict):
        return None
    preprocessing = manifest.get("preprocessing")
    convention = (preprocessing.get("input_convention") if isinstance(preprocessing, dict) else None) or "signed_unit"
    return convention if convention in CONVENTIONS else None


def dequantize(q, scale, zero_point):
    q = np.asarray(q)
    if q.dtype.kind == "f" or not scale:
        return q.astype(np.float32)
    return ((q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


class Model(object):
    """One interpreter, built once, with its inputs ready to cycle through."""

    def __init__(self, path, runtime, threads, xnnpack, name=None, convention="auto", reference_kernels=False):
        interpreter_cls, resolver, self.runtime, self.runtime_version = runtime
        data = read_model(path)
        self.path = path
        self.name = name or os.path.splitext(os.path.basename(path))[0]
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.bytes = len(data)
        kwargs = {"model_content": data, "num_threads": threads}
        if reference_kernels:
            # The portable C++ kernels: the same integers on every CPU, where the optimized builtin int8
            # kernels round some requantizations differently on aarch64 than on x86 (by one quantum).
            if resolver is None or not hasattr(resolver, "BUILTIN_REF"):
                raise RunnerError("%s %s has no reference kernels (OpResolverType.BUILTIN_REF)" % (
                    self.runtime, self.runtime_version))
            kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_REF
            xnnpack = False
        elif resolver is not None:
            kwargs["experimental_op_resolver_type"] = (resolver.AUTO if xnnpack
                                                       else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        elif not xnnpack:
            raise RunnerError("%s %s cannot turn XNNPACK off (no OpResolverType)" % (self.runtime,
                                                                                   self.runtime_version))
        start = time.perf_counter()
        self.xnnpack_refused = None
        try:
            self.interpreter = interpreter_cls(**kwargs)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            if not (xnnpack and resolver is not None and "XNNPACK" in str(exc)):
                raise RunnerError("%s cannot load %s: %s" % (self.runtime, path, str(exc).strip().splitlines()[-1]))
            # XNNPACK refuses the whole graph (extreme requantization scales): time what does run, the
            # builtin kernels, and say so in the result instead of failing the whole bench.
            self.xnnpack_refused = str(exc).strip().splitlines()[0][:200]
            kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            try:
                self.interpreter = interpreter_cls(**kwargs)
                self.interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as exc2:
                raise RunnerError("%s cannot load %s: %s" % (self.runtime, path,
                                                             str(exc2).strip().splitlines()[-1]))
        self.init_ms = (time.perf_counter() - start) * 1000.0
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()
        self.feeds = []
        self.convention, self.convention_from = self.input_convention(convention)

    def input_convention(self, asked):
        """(convention, where it was read): as asked, else stated by the input tensor, else the manifest."""
        if asked != "auto":
            if asked not in CONVENTIONS:
                raise RunnerError("unknown input convention %r; choose auto, %s" % (asked, ", ".join(CONVENTIONS)))
            return asked, "asked for"
        detail = self.inputs[0]
        dtype = np.dtype(detail["dtype"])
        scale, zero = detail["quantization"]
        if dtype.kind in "iu" and dtype.itemsize == 1:
            return PIXEL_TENSORS.get((dtype.name, float(scale), int(zero)), "signed_unit"), "input tensor"
        recorded = manifest_convention(self.path)
        if recorded is not None:
            return recorded, "manifest"
        return "signed_unit", "assumed (no manifest; pass --input-convention)"

    def ops(self):
        """Node count and delegate partitions: how much of the graph XNNPACK (or another delegate) took."""
        try:
            details = self.interpreter._get_ops_details()
        except (AttributeError, ValueError, RuntimeError):
            return {}
        partitions = sum(1 for d in details if d.get("op_name") == "DELEGATE")
        return {"nodes": len(details) - partitions, "delegate_partitions": partitions}

    def precision(self):
        """'int8' when most tensors are 8-bit integers, else the dtype of most tensors."""
        counts = {}  # type: dict[str, int]
        for t in self.interpreter.get_tensor_details():
            key = getattr(t["dtype"], "__name__", str(t["dtype"]))
            counts[key] = counts.get(key, 0) + 1
        return max(sorted(counts), key=lambda k: counts[k]) if counts else None

    def prepare_inputs(self, samples, seed, value_range=None):
        """One feed (list of arrays, one per input) per sample; random pixels if no samples.

        uint8 samples are decoded pixels, turned into this model's input
        convention; float samples are the model's own float input values
        (quantized with its scale and zero point); samples already in its
        integer input type go in as they are. ``value_range`` draws random
        float inputs in that range instead of pixels.
        """
        rng = np.random.default_rng(seed)
        count = len(samples) if samples is not None else RANDOM_SAMPLES
        if samples is not None and len(self.inputs) > 1:
            raise RunnerError("--inputs gives one array per sample, but the model has %d inputs" % len(self.inputs))
        feeds = []
        for i in range(count):
            feed = []
            for detail in self.inputs:
                shape = tuple(int(s) for s in detail["shape"])
                if samples is not None:
                    feed.append(self.feed_sample(i, samples[i], detail, shape))
                elif value_range is not None:
                    x = rng.uniform(value_range[0], value_range[1], size=shape).astype(np.float32)
                    feed.append(quantize(x, detail["dtype"], *detail["quantization"]))
                else:
                    pixels = rng.integers(0, 256, size=shape).astype(np.uint8)
                    feed.append(quantize(model_input(pixels, self.convention), detail["dtype"],
                                         *detail["quantization"]))
            feeds.append(feed)
        self.feeds = feeds

    def feed_sample(self, i, sample, detail, shape):
        """One sample as this model's input tensor (pixels through its convention)."""
        x = np.asarray(sample)
        if x.shape != shape[1:] and x.shape != shape:
            raise RunnerError("input sample %d has shape %s; the model wants %s" % (i, x.shape, shape))
        x = x.reshape(shape)
        scale, zero = detail["quantization"]
        if x.dtype == np.uint8:
            return quantize(model_input(x, self.convention), detail["dtype"], scale, zero)
        if x.dtype.kind == "f":
            return quantize(x, detail["dtype"], scale, zero)
        if x.dtype != np.dtype(detail["dtype"]):
            raise RunnerError("input samples are %s; the model wants %s (or uint8 pixels, or its float input "
                              "values)" % (x.dtype, np.dtype(detail["dtype"]).name))
        return x

    def set_feed(self, i):
        feed = self.feeds[i % len(self.feeds)]
        for detail, x in zip(self.inputs, feed):
            self.interpreter.set_tensor(detail["index"], x)

    def timed_invoke(self, i):
        self.set_feed(i)
        start = time.perf_counter()
        self.interpreter.invoke()
        return (time.perf_counter() - start) * 1000.0

    def save_outputs(self, folder):
        """Run every feed once and save raw and dequantized outputs (per output tensor)."""

        if not os.path.isdir(folder):
            os.makedirs(folder)
        raw = [[] for _ in self.outputs]  # type: list[list]
        for i in range(len(self.feeds)):
            self.set_feed(i)
            self.interpreter.invoke()
            for k, detail in enumerate(self.outputs):
                raw[k].append(np.array(self.interpreter.get_tensor(detail["index"])))
        files = []
        for k, detail in enumerate(self.outputs):
            stacked = np.concatenate(raw[k], axis=0)
            scale, zero = detail["quantization"]
            base = os.path.join(folder, "%s_output%d" % (self.name, k))
            np.save(base + ".npy", stacked, allow_pickle=False)
            np.save(base + "_float.npy", dequantize(stacked, scale, zero), allow_pickle=False)
            files.append({"raw": os.path.basename(base + ".npy"), "float": os.path.basename(base + "_float.npy"),
                          "shape": list(stacked.shape), "dtype": stacked.dtype.name})
        return files

    def describe(self):
        detail = self.inputs[0]
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "bytes": self.bytes,
                "precision": self.precision(), "input_dtype": np.dtype(detail["dtype"]).name,
                "input_shape": [int(s) for s in detail["shape"]], "input_convention": self.convention,
                "input_convention_from": self.convention_from}


def summarize(times_ms):
    a = np.asarray(times_ms, dtype=np.float64)
    pct = np.percentile(a, [50, 90, 99])
    return {"min": round(float(a.min()), 4), "p50": round(float(pct[0]), 4), "p90": round(float(pct[1]), 4),
            "p99": round(float(pct[2]), 4), "mean": round(float(a.mean()), 4), "max": round(float(a.max()), 4),
            "std": round(float(a.std()), 4)}


def load_samples(path):
    try:
        samples = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RunnerError("cannot read inputs %s: %s" % (path, exc))
    if samples.ndim < 2 or len(samples) == 0:
        raise RunnerError("inputs %s must be a non-empty batch (N, ...), got shape %s" % (path, samples.shape))
    return samples


def bench(args):
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        raise RunnerError("--runs and --threads must be at least 1 and --warmup at least 0")
    runtime = load_runtime(args.runtime)
    names = args.name or []
    conventions = args.input_convention or []
    if len(conventions) not in (0, 1, len(args.models)):
        raise RunnerError("give --input-convention once for every model, or once for all")
    models = [Model(p, runtime, args.threads, not args.no_xnnpack, names[i] if i < len(names) else None,
                    conventions[min(i, len(conventions) - 1)] if conventions else "auto", args.reference_kernels)
              for i, p in enumerate(args.models)]
    samples = load_samples(args.inputs) if args.inputs else None
    value_range = _value_range(args)
    for m in models:
        m.prepare_inputs(samples, args.seed, value_range)
    for i in range(args.warmup):
        for m in models:
            m.timed_invoke(i)
    times = [[] for _ in models]  # type: list[list[float]]
    for i in range(args.runs):
        for k, m in enumerate(models):
            times[k].append(m.timed_invoke(i))
    results = []
    for k, m in enumerate(models):
        result = {"schema": SCHEMA, "model": m.describe(), "init_ms": round(m.init_ms, 3),
                  "latency_ms": summarize(times[k]), "runs": args.runs, "warmup": args.warmup,
                  "threads": args.threads,
                  "xnnpack": not (args.no_xnnpack or args.reference_kernels) and not m.xnnpack_refused,
                  "kernels": "reference" if args.reference_kernels else "optimized",
                  "xnnpack_refused": m.xnnpack_refused, "ops": m.ops(),
                  "runtime": {"name": m.runtime, "version": m.runtime_version},
                  "numpy": np.__version__,
                  "inputs": {"source": "file" if samples is not None else "random", "count": len(m.feeds),
                             "range": (None if samples is not None else list(value_range) if value_range
                                       else "pixels 0..255")}}
        warning = xnnpack_warning(result)
        result["warnings"] = [warning] if warning else []
        if warning:
            sys.stderr.write("warning: %s\n" % warning)
        if args.keep_times:
            result["times_ms"] = [round(t, 4) for t in times[k]]
        if args.outputs:
            result["outputs"] = {"folder": args.outputs, "files": m.save_outputs(args.outputs)}
        results.append(result)
    machine = machine_info()
    rss = peak_rss_mb()
    for r in results:
        r["machine"] = machine
        r["peak_rss_mb"] = rss  # one process: the peak covers every model loaded in it
    if len(results) == 1:
        return results[0]
    ratios = [b / a for a, b in zip(times[0], times[1]) if a > 0]
    return {"schema": SCHEMA, "compare": {"a": results[0]["model"]["name"], "b": results[1]["model"]["name"],
                                          "pairs": len(ratios), "ratio_b_over_a": summarize(ratios)},
            "results": results}


def xnnpack_warning(result):
    """A quantized model of which XNNPACK took nothing runs on builtin kernels, several times slower: say so.

    tflite-runtime 2.14's XNNPACK takes no int8 op (an int8 Xception-299 ran in
    305 ms there against 46 ms under ai-edge-litert 2.3), while its float ops
    go through XNNPACK as usual.
    """
    model, ops, rt = result["model"], result["ops"] or {}, result["runtime"]
    quantized = model["precision"] in ("int8", "uint8", "int16") or model["input_dtype"] in ("int8", "uint8")
    if not (quantized and result["xnnpack"] and ops.get("delegate_partitions") == 0):
        return None
    where = ("%s %s" % (rt["name"], rt["version"] or "")).strip()
    if rt["name"] == "ai_edge_litert":
        return ("XNNPACK took none of the %s nodes of this quantized model under %s: they run on builtin kernels; "
                "check the ops the conversion left (the manifest's ops_left_float)" % (ops.get("nodes"), where))
    return ("XNNPACK took none of the %s nodes of this quantized model under %s: they run on builtin kernels, "
            "several times slower; ai-edge-litert (pip install ai-edge-litert) runs it through XNNPACK"
            % (ops.get("nodes"), where))


def _value_range(args):
    """(min, max) of random float inputs, or None for random pixels (each model in its own convention)."""
    if args.range_min is None and args.range_max is None:
        return None
    if args.range_min is None or args.range_max is None:
        raise RunnerError("--range-min and --range-max go together")
    return (args.range_min, args.range_max)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time a .tflite model here and print one JSON object.")
    p.add_argument("models", nargs="+", help="one .tflite, or two to compare (runs alternate A, B)")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-xnnpack", action="store_true", help="builtin kernels only, no default delegate")
    p.add_argument("--reference-kernels", action="store_true",
                   help="the runtime's reference kernels (portable C++, the same integers on every CPU): to check "
                        "a board or an emulator, never to time one")
    p.add_argument("--runtime", default="auto", help="auto, " + ", ".join(RUNTIMES))
    p.add_argument("--inputs", help="a .npy batch (N, H, W, C): uint8 decoded pixels (fed in each model's input "
                                    "convention), the model's float input values, or values already in its "
                                    "integer input type")
    p.add_argument("--outputs", help="folder to save the outputs of every input (raw and dequantized .npy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--range-min", type=float, help="random float inputs from this (default: random pixels)")
    p.add_argument("--range-max", type=float)
    p.add_argument("--input-convention", action="append", choices=("auto",) + CONVENTIONS,
                   help="what each model's input holds (once per model, or once for all; default auto: the "
                        "input tensor, else a manifest beside the model, else [-1, 1])")
    p.add_argument("--name", action="append", help="display name of each model (default: file stem)")
    p.add_argument("--keep-times", action="store_true", help="include every run's time in the JSON")
    args = p.parse_args(argv)
    if len(args.models) > 2:
        p.error("give one model, or two to compare")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        result = bench(args)
    except RunnerError as exc:
        print(json.dumps({"schema": SCHEMA, "error": str(exc)}))
        sys.stderr.write("error: %s\n" % exc)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
