"""Keep TensorFlow's native log lines off the user's terminal, but not lost.

TensorFlow's C++ side writes straight to file descriptor 2, so Python-level
redirection cannot hide it. ``native_stderr_captured`` swaps fd 2 for a
temporary file while a noisy call runs and gives back what was written, so an
error can quote the converter's own diagnosis instead of a wall of logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading


class Captured:
    text: str = ""

    def tail(self, lines: int = 8) -> str:
        keep = [ln for ln in self.text.splitlines() if ln.strip()]
        return "\n".join(keep[-lines:])


# fd 2 is one per process: captures overlapping in time on different threads (calibration workers
# building interpreters) share one redirection, made by the first and undone by the last.
_lock = threading.Lock()
_shared: dict = {"depth": 0, "saved": -1, "tmp": None}


@contextlib.contextmanager
def native_stderr_captured():
    """fd 2 goes to a temporary file inside the block; ``captured.text`` has what was written meanwhile."""
    captured = Captured()
    if os.environ.get("XEDGE_VERBOSE"):
        yield captured
        return
    with _lock:
        if _shared["depth"] == 0:
            try:
                sys.stderr.flush()
                saved = os.dup(2)
            except (OSError, ValueError):
                saved = -1
            if saved < 0:
                tmp = None
            else:
                tmp = tempfile.TemporaryFile(mode="w+b")
                os.dup2(tmp.fileno(), 2)
            _shared.update(saved=saved, tmp=tmp)
        _shared["depth"] += 1
        tmp = _shared["tmp"]
        start = os.lseek(tmp.fileno(), 0, os.SEEK_END) if tmp is not None else 0
    try:
        yield captured
    finally:
        with _lock:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            if tmp is not None:
                end = os.lseek(tmp.fileno(), 0, os.SEEK_END)
                captured.text = os.pread(tmp.fileno(), end - start, start).decode("utf-8", "replace")
            _shared["depth"] -= 1
            if _shared["depth"] == 0 and tmp is not None:
                os.dup2(_shared["saved"], 2)
                os.close(_shared["saved"])
                tmp.close()
                _shared.update(saved=-1, tmp=None)


def quiet_tensorflow() -> None:
    """Set before TensorFlow is imported: only errors from its C++ logging."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def import_tensorflow_quietly():
    """Import TensorFlow (and initialise its devices) with the start-up log captured.

    TensorFlow 2.21 logs oneDNN and CUDA notices through absl before
    ``TF_CPP_MIN_LOG_LEVEL`` is read, so only a captured fd 2 keeps them off
    the terminal. ``XEDGE_VERBOSE=1`` shows everything.
    """
    quiet_tensorflow()
    already = "tensorflow" in sys.modules
    with native_stderr_captured():
        import tensorflow as tf

        if not already:
            tf.config.list_physical_devices()
    if not os.environ.get("XEDGE_VERBOSE"):
        try:
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.ERROR)
        except ImportError:
            pass
        tf.get_logger().setLevel(logging.ERROR)
    return tf
