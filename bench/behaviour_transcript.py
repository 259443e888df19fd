"""The CLI's observable behaviour as text: every --help, the manifest keys of every mode, and the exit code and
stderr of the error cases.

A refactor of ``convert.py`` runs this before and after and diffs the two outputs: what changed is then what
the change meant to change. Not a test (it converts a model in every mode and takes a few minutes) and not a
speed measurement; it lives in ``bench/`` beside the other scripts that are run by hand.

    PYTHONPATH=$PWD .venv/bin/python bench/behaviour_transcript.py > transcript.txt
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
TINY = dict(input_size=71, classes=10, width=0.25, middle_blocks=1)
XEDGE_COMMANDS = ("bench", "convert", "demo", "diff", "latency-test", "parity", "qat", "sweep", "train", "validate")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = VENV_BIN / args[0]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "120"}
    return subprocess.run([str(exe), *args[1:]], cwd=cwd, capture_output=True, text=True, env=env, timeout=900)


def keys(value, prefix: str = "") -> list[str]:
    """Every key path of a JSON value (lists: the keys of their dict items, once)."""
    found = []
    if isinstance(value, dict):
        for key in sorted(value):
            found.append(prefix + key)
            found += keys(value[key], prefix + key + ".")
    elif isinstance(value, list):
        for item in value:
            found += [k for k in keys(item, prefix + "[].") if k not in found]
    return found


def tidy(text: str, tmp: Path) -> str:
    """Paths and numbers that differ from run to run replaced, so that two transcripts diff cleanly."""
    text = text.replace(str(tmp), "<TMP>")
    text = re.sub(r"\d+\.\d+ s\b", "<S> s", text)
    return text.rstrip()


def build(tmp: Path) -> dict[str, Path]:
    import keras

    from pipeline.core.digits import write_digits
    from pipeline.model.xception import build_xception

    folders = write_digits(tmp / "digits")
    keras.utils.set_random_seed(0)  # the same untrained weights in every transcript, so --max-drop's figures match
    build_xception(**TINY).save(tmp / "tiny.keras")
    x = inputs = keras.Input((71, 71, 3))
    x = keras.layers.Lambda(lambda t: t, name="sneaky")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)).save(tmp / "lambda.keras")
    return {"model": tmp / "tiny.keras", "lambda": tmp / "lambda.keras", **folders}


def helps(tmp: Path) -> None:
    for args in [("convert", "--help"), ("xedge", "--help")] + [("xedge", c, "--help") for c in XEDGE_COMMANDS]:
        proc = run(*args, cwd=tmp)
        print(f"\n=== {' '.join(args)} (exit {proc.returncode})\n{tidy(proc.stdout + proc.stderr, tmp)}")


def manifests(tmp: Path, f: dict[str, Path]) -> None:
    model, calib = str(f["model"]), str(f["samples"])
    cases = [
        ("float", [model, "--float"]),
        ("dynamic", [model, "--dynamic"]),
        ("fp16", [model, "--fp16"]),
        ("int8", [model, "--int8", "--calib", calib, "--calib-size", "16"]),
        ("int16x8", [model, "--int16x8", "--calib", calib, "--calib-size", "16"]),
        ("int8-float-io", [model, "--int8", "--float-io", "--calib", calib, "--calib-size", "16"]),
        ("tflite-int8", ["@float", "--int8", "--calib", calib, "--calib-size", "16"]),
        ("int8-max-drop", [model, "--int8", "--calib", calib, "--calib-size", "16", "--max-drop", "100",
                           "--eval", str(f["val"]), "--eval-limit", "20"]),
    ]
    for name, args in cases:
        out = tmp / "out" / f"{name}.tflite"
        out.parent.mkdir(exist_ok=True)
        args = [str(tmp / "out" / "float.tflite") if a == "@float" else a for a in args]
        proc = run("convert", *args, "--out", str(out), "--json", cwd=tmp)
        print(f"\n=== convert {name} (exit {proc.returncode})")
        if proc.returncode != 0:
            print(tidy(proc.stderr, tmp))
            continue
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        print("summary keys: " + " ".join(sorted(summary)))
        manifest = json.loads(out.with_suffix(".manifest.json").read_text())
        print("manifest keys:\n  " + "\n  ".join(keys(manifest)))
        table = run("convert", *args, "--out", str(out), "--force", cwd=tmp)
        print(f"--- table output (exit {table.returncode})\n{tidy(table.stdout, tmp)}\n--- stderr\n"
              f"{tidy(table.stderr, tmp)}")


def errors(tmp: Path, f: dict[str, Path]) -> None:
    model, calib = str(f["model"]), str(f["samples"])
    (tmp / "exists.tflite").write_bytes(b"x")
    cases = [
        ("missing model", ["convert", str(tmp / "nope.keras"), "--float"]),
        ("no mode", ["convert", model]),
        ("no model, no runs/latest", ["convert", "--float"]),
        ("output exists", ["convert", model, "--float", "--out", str(tmp / "exists.tflite")]),
        ("int8 without calib", ["convert", model, "--int8"]),
        ("calib with float", ["convert", model, "--float", "--calib", calib]),
        ("float-io with float", ["convert", model, "--float", "--float-io"]),
        ("max-drop without eval", ["convert", model, "--int8", "--calib", calib, "--max-drop", "1"]),
        ("eval without max-drop", ["convert", model, "--int8", "--calib", calib, "--eval", calib]),
        ("labels without eval", ["convert", model, "--int8", "--calib", calib, "--labels", "x.json"]),
        ("max-drop with fp16", ["convert", model, "--fp16", "--max-drop", "1", "--eval", calib]),
        ("fallback int16 without max-drop", ["convert", model, "--int8", "--calib", calib, "--fallback", "int16"]),
        ("fallback int16 with int16x8", ["convert", model, "--int16x8", "--calib", calib, "--fallback", "int16",
                                         "--max-drop", "1", "--eval", calib]),
        ("pixels-int8 with float-io", ["convert", model, "--int8", "--float-io", "--calib", calib,
                                       "--input-convention", "pixels-int8"]),
        ("pixels-int8 with fp16", ["convert", model, "--fp16", "--input-convention", "pixels-int8"]),
        ("pixels with int16x8", ["convert", model, "--int16x8", "--calib", calib, "--input-convention", "pixels"]),
        ("learned rounding with fp16", ["convert", model, "--fp16", "--rounding", "learned"]),
        ("mse ranges with int16x8", ["convert", model, "--int16x8", "--calib", calib, "--ranges", "mse"]),
        ("bias correction with float", ["convert", model, "--float", "--bias-correction"]),
        ("bad choice", ["convert", model, "--float", "--calibrator", "slow"]),
        ("lambda model refused", ["convert", str(f["lambda"]), "--float"]),
        ("bench compare with thread list", ["xedge", "bench", "x.tflite", "--compare", "y.tflite",
                                            "--threads", "1,2"]),
        ("bench bad threads", ["xedge", "bench", "x.tflite", "--threads", "a"]),
        ("parity without target", ["xedge", "parity", "x.tflite", "--eval", calib]),
        ("validate missing model", ["xedge", "validate", "a.keras", "b.tflite", "--data", calib, "--report", "r"]),
        ("train missing data", ["xedge", "train", "--data", str(tmp / "nodata"), "--out", str(tmp / "run")]),
        ("train bad lr", ["xedge", "train", "--data", str(f["train"]), "--out", str(tmp / "run"), "--lr", "-1"]),
        ("qat missing model", ["xedge", "qat", str(tmp / "nope.keras"), "--data", str(f["train"])]),
        ("latency-test unknown device", ["xedge", "latency-test", "--device", "no-such-device"]),
    ]
    for name, args in cases:
        proc = run(*args, cwd=tmp)
        print(f"\n=== error: {name} (exit {proc.returncode})\n{tidy(proc.stderr, tmp)}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="xedge-transcript-") as name:
        tmp = Path(name).resolve()
        files = build(tmp)
        helps(tmp)
        errors(tmp, files)
        manifests(tmp, files)


if __name__ == "__main__":
    main()
