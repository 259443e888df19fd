"""A device profile as a parity target: the runner on the device, fed the exact input tensors, outputs fetched.

The feed goes to the device as a ``.npy`` batch already in the model's input
dtype (``pipeline.validation.parity_images.runner_inputs`` made it), so the
runner sets it as it is and computes nothing from it: the device's
interpreter is the only thing that differs from the build machine. A profile
whose ``python`` is another interpreter's venv (tflite-runtime 2.14, say)
makes that runtime a target on this machine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from devices.profile import DeviceProfile, load_profile
from devices.transport_base import BenchRequest
from devices.transports import get_transport
from pipeline.core.errors import DeviceError
from pipeline.validation.parity import Outputs, Step
from pipeline.validation.parity_images import Feed, ModelIO

MAX_OUTPUT_BYTES = 1 << 30  # a class score per image: far below this for any feed the tool sends


class DeviceTarget:
    """One model on one device profile, run once per image through the profile's transport."""

    def __init__(self, profile: DeviceProfile, model: Path):
        self.profile, self.model = profile, Path(model)
        self.name = f"device {profile.name}"

    def request(self, inputs: Path, outputs: Path) -> BenchRequest:
        """One timed run (the bench needs one) and every feed saved: the outputs are what parity wants."""
        p = self.profile
        return BenchRequest(models=(self.model,), runs=1, warmup=0, threads=p.threads, xnnpack=p.xnnpack,
                            runtime=p.runtime, inputs=inputs, outputs=outputs)

    def run(self, feed: Feed, step: Step | None = None) -> Outputs:
        n = len(feed.tensor)
        with tempfile.TemporaryDirectory(prefix="xedge-parity-") as tmp:
            inputs, outputs = Path(tmp) / "inputs.npy", Path(tmp) / "outputs"
            np.save(inputs, np.ascontiguousarray(feed.tensor), allow_pickle=False)
            result = get_transport(self.profile).bench(self.request(inputs, outputs))
            base = outputs / f"{self.model.stem}_output0"
            raw, scores = (self.read_outputs(Path(f"{base}{suffix}.npy"), n) for suffix in ("", "_float"))
        if step:
            step(n)
        runtime = result.get("runtime") or {}
        machine = result.get("machine") or {}
        return Outputs(scores.astype(np.float32), raw,
                       f"{runtime.get('name', '?')} {runtime.get('version') or '?'}",
                       f"device {self.profile.name} over {self.profile.transport} ({machine.get('machine', '?')}"
                       f"{', emulated' if self.profile.emulated else ''}, python {machine.get('python', '?')})",
                       f"the same {feed.tensor.dtype} input tensors as a .npy batch, set as they are")


    def read_outputs(self, path: Path, n: int) -> np.ndarray:
        """One array the runner saved: ``n`` rows of numbers, or a ``DeviceError`` (a device is not trusted to
        write well-formed files: truncated, malformed, pickled or oversized ones are refused here)."""
        try:
            if path.stat().st_size > MAX_OUTPUT_BYTES:
                raise DeviceError(f"{self.name}: the runner's {path.name} is over {MAX_OUTPUT_BYTES >> 20} MiB")
            array = np.load(path, allow_pickle=False)
        except DeviceError:
            raise
        except OSError as exc:
            raise DeviceError(f"{self.name}: the runner saved no outputs ({exc.strerror or exc})") from None
        except Exception as exc:  # noqa: BLE001 - numpy's header parser raises many types on a malformed file
            raise DeviceError(f"{self.name}: the runner's {path.name} is not a readable .npy "
                              f"({type(exc).__name__}: {str(exc)[:80]})") from None
        if array.dtype.kind not in "biuf" or array.size == 0 or array.size % n:
            raise DeviceError(f"{self.name}: the runner's {path.name} holds {array.dtype} {list(array.shape)}, "
                              f"not {n} rows of outputs")
        return array.reshape(n, -1)


def device_target(name: str):
    """A parity target factory for the profile ``name`` (loaded now, so an unknown name fails first)."""
    profile = load_profile(name)

    def make(model: Path, io: ModelIO) -> DeviceTarget:
        return DeviceTarget(profile, model)

    return make
