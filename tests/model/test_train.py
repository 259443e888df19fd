"""Training: outputs, the digits accuracy goal, resume after kill -9, SIGTERM, refused resume, weights by order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import VENV_BIN, invoke_cli, run_cli

TINY_ARGS = ["--input-size", "71", "--width", "0.25", "--middle-blocks", "1"]


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """300 digits: enough for several steps per epoch, small enough to decode in a blink."""
    from pipeline.core.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("small_digits"), limit=300)


def test_run_folder_holds_labels_and_manifest(trained_run, digits):
    run = Path(trained_run.run_dir)
    labels = json.loads((run / "labels.json").read_text())
    assert labels == {"classes": [str(d) for d in range(10)]}
    m = json.loads((run / "manifest.json").read_text())
    assert m["kind"] == "training-run" and m["tool"] == "xception-edge"
    assert len(m["data"]["digest"]) == 64 and m["data"]["train_images"] > 1000
    assert m["config"]["epochs"] == 3 and m["config"]["bn_momentum"] == 0.9
    assert [r["epoch"] for r in m["history"]] == [1, 2, 3]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["images_per_s"] > 0 for r in m["history"])
    assert m["versions"]["tensorflow"] and m["devices"]["kind"] == "cpu" and m["devices"]["replicas"] == 1
    assert m["images_per_s"] > 0 and m["model"]["sha256"] and m["preprocessing"]["fingerprint"]
    # A tiny model, 3 epochs: far above chance (0.1) on ten classes.
    assert trained_run.val_accuracy > 0.6
    assert not (run / ".backup").exists()
    assert any((run / "logs").rglob("*tfevents*"))


def test_digits_reach_095_and_convert_finds_the_latest_run(tmp_path, digits):
    """The documented goal: --epochs 6 --input-size 71 --width 0.25 (default middle blocks) >= 0.95."""
    t0 = time.perf_counter()
    proc = run_cli("xedge", "train", "--data", digits["train"], "--out", "runs/digits", "--epochs", "6",
                   "--input-size", "71", "--width", "0.25", cwd=tmp_path, check=True)
    seconds = time.perf_counter() - t0
    m = json.loads((tmp_path / "runs/digits/manifest.json").read_text())
    best = m["history"][-1]["val_accuracy"]
    print(f"digits: val_accuracy {best:.4f} in {seconds:.0f} s (CLI, incl. start-up)")
    assert best >= 0.95, proc.stdout
    assert "validation accuracy" in proc.stdout
    assert os.readlink(tmp_path / "runs/latest") == "digits"
    conv = invoke_cli("convert", "--float", "--json", cwd=tmp_path, check=True)  # in-process: what it finds
    assert json.loads(conv.stdout.strip().splitlines()[-1])["mode"] == "float"
    assert (tmp_path / "runs/digits/model_float.tflite").exists()


def _train_cmd(data, out, *extra):
    return [str(VENV_BIN / "xedge"), "train", "--data", str(data), "--out", str(out), "--epochs", "2",
            "--batch-size", "16", "--checkpoint-every", "2", *TINY_ARGS, *extra]


KILL_SCRIPT = """
import os, signal, sys
import convert
from pipeline.model import steps
real, calls = steps.Steps.train_step, [0]

def train_step(self, iterator):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_CALL"]):  # the process dies here, as under kill -9
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, iterator)

steps.Steps.train_step = train_step
convert.cli(sys.argv[1:])
"""

# Stops the training at a known step until the test's signal has been handled: a line on the pipe PAUSE_FD says
# "send it now", and the step goes on only once the handler the run installed has run.
PAUSE_SCRIPT = """
import os, signal, sys, threading
import convert
from pipeline.model import steps
real, calls = steps.Steps.train_step, [0]

def train_step(self, iterator):
    calls[0] += 1
    if calls[0] == int(os.environ["PAUSE_AT_CALL"]):
        handler, landed = signal.getsignal(signal.SIGTERM), threading.Event()

        def handled(signum, frame):
            handler(signum, frame)
            landed.set()

        signal.signal(signal.SIGTERM, handled)
        os.write(int(os.environ["PAUSE_FD"]), b"paused\\n")
        if not landed.wait(600):  # a test that never signals must not leave us behind for ever
            sys.exit("no signal came")
        signal.signal(signal.SIGTERM, handler)
    return real(self, iterator)

steps.Steps.train_step = train_step
convert.cli(sys.argv[1:])
"""


def _weights(run: Path) -> list[np.ndarray]:
    import keras

    return [np.asarray(w) for w in keras.saving.load_model(run / "model.keras").weights]


def test_resume_after_kill_9_mid_epoch_equals_an_uninterrupted_run(tmp_path, small_digits):
    """Killed with SIGKILL at a known step (the 6th of the first epoch; the last checkpoint is after step 4),
    then resumed by the same command: same step count, same weights bit for bit, and the first epoch's
    loss and accuracy are those of the run that was never stopped (they cover the steps before the kill).

    Bit for bit because nothing in a step is random or timing-dependent on one CPU: batches and
    augmentation are functions of (seed, epoch, position), the checkpoint holds the exact float32
    weights, optimizer state and epoch sums, and the same process setup runs the same kernels.
    """
    out, reference = tmp_path / "run", tmp_path / "reference"
    cmd = _train_cmd(small_digits["train"], out)
    killed = subprocess.run([str(VENV_BIN / "python"), "-c", KILL_SCRIPT, *cmd[1:]], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "KILL_AT_CALL": "6"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = json.loads((out / ".backup/state.json").read_text())
    assert (state["epoch"], state["step"]) == (0, 4) and not (out / "model.keras").exists()

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    subprocess.run(_train_cmd(small_digits["train"], reference), capture_output=True, text=True, timeout=300,
                   check=True)
    m = json.loads((out / "manifest.json").read_text())
    r = json.loads((reference / "manifest.json").read_text())
    assert m["resumed_from"] == {"epoch": 0, "step": 4} and r["resumed_from"] is None
    assert m["optimizer"]["steps"] == r["optimizer"]["steps"] == 2 * r["optimizer"]["steps_per_epoch"]
    assert m["history"][0]["resumed_at_step"] == 4
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert [row[key] for row in m["history"]] == [row[key] for row in r["history"]], key
    ours, theirs = _weights(out), _weights(reference)
    assert len(ours) == len(theirs)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    assert not (out / ".backup").exists()
    # Running the finished command again is refused instead of silently retraining.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr


def test_sigterm_saves_a_checkpoint_and_a_changed_config_is_refused(tmp_path, small_digits):
    """SIGTERM while the 3rd step of the first epoch runs (the pause hook holds it there until the signal was
    handled): the run checkpoints after that step and exits 143, never at a checkpoint of its own schedule."""
    out = tmp_path / "run"
    cmd = _train_cmd(small_digits["train"], out, "--checkpoint-every", "1000")
    paused, pause_fd = os.pipe()
    proc = subprocess.Popen([str(VENV_BIN / "python"), "-c", PAUSE_SCRIPT, *cmd[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, pass_fds=(pause_fd,),
                            env={**os.environ, "PAUSE_AT_CALL": "3", "PAUSE_FD": str(pause_fd)})
    os.close(pause_fd)
    try:
        with os.fdopen(paused) as pipe:
            said = pipe.readline()  # blocks until step 3 waits, or the process ended (then "")
        assert said == "paused\n", proc.communicate(timeout=60)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "run the same command to resume" in stderr and "Traceback" not in stderr
    state = json.loads((out / ".backup/state.json").read_text())
    assert (state["epoch"], state["step"]) == (0, 3)  # the interrupt landed in step 3, and was obeyed after it
    assert (out / ".backup" / state["checkpoint"]).exists()

    changed = subprocess.run(cmd + ["--lr", "0.01"], capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and "different configuration" in lines[0] and "lr" in lines[0], changed.stderr


def test_stratified_split_is_deterministic_and_per_class():
    from pipeline.model.tfdata import stratified_split

    labels = np.repeat(np.arange(4), [10, 20, 30, 1])
    train, val = stratified_split(labels, 0.1, seed=3)
    again = stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert sorted(np.bincount(labels[val], minlength=4).tolist()) == [0, 1, 2, 3]
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)


def test_epoch_batches_are_reproducible_for_resume():
    """A run resumed at step k sees exactly the batches k.. of the interrupted run."""
    from pipeline.core.preprocessing import PreprocessSpec
    from pipeline.model.tfdata import Images, train_dataset

    rng = np.random.default_rng(0)
    images = Images(rng.integers(0, 10, 40), PreprocessSpec(size=71),
                    pixels=rng.integers(0, 256, (40, 71, 71, 3), dtype=np.uint8))
    full = list(train_dataset(images, epoch=1, seed=5, steps=5, batch=8).as_numpy_iterator())
    tail = list(train_dataset(images, epoch=1, seed=5, steps=5, batch=8, start_step=3).as_numpy_iterator())
    assert len(full) == 5 and len(tail) == 2
    for (xa, ya), (xb, yb) in zip(full[3:], tail):
        assert np.array_equal(ya, yb) and np.allclose(xa, xb)
    assert full[0][0].min() >= -1.0 and full[0][0].max() <= 1.0


def test_keras_xception_weights_map_by_order(tmp_path):
    """A Keras applications Xception .weights.h5 initialises build_xception; the classifier is skipped."""
    import keras

    from pipeline.model.xception import build_xception
    from pipeline.model.pretrained import load_by_order

    reference = keras.applications.Xception(weights=None, include_top=True, input_shape=(71, 71, 3), classes=1000)
    path = tmp_path / "xception.weights.h5"
    reference.save_weights(path)
    ours = build_xception(71, 7)
    report = load_by_order(ours, path)
    assert report["classifier"].startswith("skipped")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 71, 71, 3)).astype("float32")
    features = keras.Model(reference.input, reference.get_layer("avg_pool").output)(x)
    ours_features = keras.Model(ours.input, ours.get_layer("avg_pool").output)(x)
    np.testing.assert_allclose(np.asarray(ours_features), np.asarray(features), rtol=1e-4, atol=1e-5)


def test_an_earlier_run_initialises_fine_tuning(trained_run):
    """--weights runs/old/model.keras: same classes, so the classifier is loaded too."""
    import keras

    from pipeline.model.pretrained import load_by_order
    from pipeline.model.train import TrainConfig, build_model

    model = build_model(TrainConfig(input_size=71, width=0.25, middle_blocks=1, freeze=5), 10)
    report = load_by_order(model, trained_run.model_path)
    assert report["classifier"] == "loaded" and report["loaded"] == report["arrays"]
    assert sum(not layer.trainable for layer in model.layers[1:]) == 5
    x = np.random.default_rng(0).uniform(-1, 1, (2, 71, 71, 3)).astype("float32")
    reference = keras.saving.load_model(trained_run.model_path)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(reference(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_multi_worker_mirrored_two_local_workers(tmp_path, small_digits):
    """Two worker processes on 127.0.0.1 (TF_CONFIG) finish one synchronous epoch together."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        cmd = [str(VENV_BIN / "xedge"), "train", "--data", str(small_digits["train"]), "--out",
               str(tmp_path / f"run{index}"), "--epochs", "1", "--batch-size", "16", *TINY_ARGS]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    m = json.loads((tmp_path / "run0/manifest.json").read_text())
    assert m["devices"]["kind"] == "multi-worker" and m["devices"]["replicas"] == 2
    assert m["devices"]["global_batch"] == 32 and len(m["history"]) == 1
    assert not (tmp_path / "run1/model.keras").exists()  # only the chief writes


def test_mixed_bfloat16_step_trains_and_saves_float32(tmp_path):
    """The GPU default (bfloat16 compute, float32 softmax) runs on the CPU; the saved model is float32."""
    import keras
    import tensorflow as tf

    from pipeline.model.steps import Steps
    from pipeline.model.train import TrainConfig, _write_outputs, build_model, make_optimizer

    cfg = TrainConfig(input_size=71, width=0.25, middle_blocks=0)
    model = build_model(cfg, 3, "mixed_bfloat16")
    optimizer = make_optimizer(cfg, 2, 4)
    optimizer.build(model.trainable_variables)
    loop = Steps(model, optimizer, tf.distribute.get_strategy(), 4, xla=False)
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensors((rng.uniform(-1, 1, (4, 71, 71, 3)).astype("float32"),
                                       np.array([0, 1, 2, 0]))).repeat(2)
    iterator = iter(ds)
    assert np.isfinite(float(loop.train_step(iterator)[0])) and int(optimizer.iterations) == 1
    assert model.get_layer("block2_sepconv1").compute_dtype == "bfloat16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    _write_outputs(tmp_path, model, cfg, ["a", "b", "c"], {})
    saved = keras.saving.load_model(tmp_path / "model.keras")
    assert all(w.dtype == "float32" for w in saved.weights)
    assert saved.get_layer("block2_sepconv1").compute_dtype == "float32"


def test_streaming_decode_matches_the_in_memory_cache(small_digits):
    """Datasets too big for memory are decoded per epoch through the same preprocessing."""
    from pipeline.core.preprocessing import PreprocessSpec
    from pipeline.model.tfdata import eval_dataset, list_labeled, load_images

    folder = list_labeled(small_digits["val"])
    spec = PreprocessSpec(size=71)
    cached = load_images(folder, spec)
    streamed = load_images(folder, spec, budget=0)
    assert cached.pixels is not None and streamed.pixels is None and streamed.paths
    (xa, ya), = list(eval_dataset(cached, 1000).as_numpy_iterator())
    (xb, yb), = list(eval_dataset(streamed, 1000).as_numpy_iterator())
    assert np.array_equal(ya, yb) and np.array_equal(xa, xb)


MIRRORED_SCRIPT = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pipeline.model.steps import Steps
from pipeline.model.train import TrainConfig, build_model, make_optimizer
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
cfg = TrainConfig(input_size=71, width=0.25, middle_blocks=0)
with strategy.scope():
    model = build_model(cfg, 3, "mixed_bfloat16")
    optimizer = make_optimizer(cfg, 2, 8)
    optimizer.build(model.trainable_variables)
loop = Steps(model, optimizer, strategy, 8, xla=True)
rng = np.random.default_rng(0)
ds = tf.data.Dataset.from_tensors((rng.uniform(-1, 1, (8, 71, 71, 3)).astype("float32"),
                                   np.array([0, 1, 2, 0, 1, 2, 0, 1]))).repeat(2)
iterator = iter(loop.distribute(ds))
losses = [float(loop.train_step(iterator)[0]) for _ in range(2)]
loss, accuracy = loop.evaluate(ds.take(1))
assert strategy.num_replicas_in_sync == 2 and int(optimizer.iterations.numpy()) == 2
assert all(np.isfinite(losses)) and np.isfinite(loss) and 0 <= accuracy <= 1
print("ok")
"""


def test_mirrored_strategy_with_xla_and_bfloat16_on_two_logical_cpus():
    """The multi-GPU path (MirroredStrategy, XLA, bfloat16), on two logical CPUs in a fresh process."""
    from tests.conftest import ROOT

    proc = subprocess.run([str(VENV_BIN / "python"), "-c", MIRRORED_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
