"""Wall time and peak memory of a child process, from the kernel's own accounting."""

from __future__ import annotations

import os
import subprocess
import time


def run_with_peak(cmd: list[str], *, env: dict | None = None, cwd=None) -> dict:
    """Like run_measured, with the child's own peak RSS via os.wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    out_chunks = []
    err = proc.stderr
    # Drain pipes without reaping, then wait4 for the rusage of this child alone.
    import threading

    def drain(stream, sink):
        sink.append(stream.read())

    errs: list = []
    t_out = threading.Thread(target=drain, args=(proc.stdout, out_chunks))
    t_err = threading.Thread(target=drain, args=(err, errs))
    t_out.start(), t_err.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    t_out.join(), t_err.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "returncode": proc.returncode, "stdout": b"".join(out_chunks).decode("utf-8", "replace"),
            "stderr": b"".join(errs).decode("utf-8", "replace")}
