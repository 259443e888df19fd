"""A real headless Chromium for the HTML tests (Debian's package; `make system-deps` installs it).

The flags keep it off the network (this machine has none) and out of any
profile: background networking, component updates and sync are off, and each
call gets its own user-data folder.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def chromium(exe: str, *args, user_dir: Path) -> subprocess.CompletedProcess:
    """``exe`` is the ``chromium_bin`` fixture (tests/conftest.py): a skip, or a failure under .ci/run, if absent."""
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={user_dir}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
