"""Device profiles: where a device is, how to reach it, and its latency budgets.

A profile is a TOML file named for the device (``pi4.toml`` is ``--device
pi4``). User folders come first (``$XEDGE_DEVICES``, a path list, then
``~/.config/xedge/devices``), then the examples packaged in
``devices/profiles/``. Unknown keys are refused, so a typo such as ``p50``
for ``p50_ms`` cannot silently drop a budget.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from devices.transports import TRANSPORTS
from pipeline.core.errors import DeviceError

PACKAGED = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class Budget:
    """Latency budget of one model (by file stem) on one device; ``path`` lets latency-test find it."""

    p50_ms: float | None = None
    p90_ms: float | None = None
    path: str | None = None

    def __post_init__(self):
        if self.p50_ms is None and self.p90_ms is None:
            raise ValueError("a budget needs p50_ms and/or p90_ms")
        for key in ("p50_ms", "p90_ms"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{key} must be a positive number of milliseconds, got {value!r}")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    transport: str = "local"
    host: str | None = None          # ssh
    port: int = 22
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None   # default: ssh's own (~/.ssh/known_hosts); never auto-accepted
    serial: str | None = None        # adb; needed when several devices are attached
    adb: str = "adb"
    benchmark_model: str | None = None  # adb: a local benchmark_model binary to push instead of Python
    python: str | None = None        # remote python; local: this interpreter
    exec_prefix: tuple[str, ...] = ()  # local: words run before python (an emulator's launcher); a relative
                                       # first word is a launcher in this package (arm64/board)
    emulated: bool = False           # an emulated CPU: its times are the emulator's, never the board's latency
    runtime: str = "auto"
    threads: int = 1
    xnnpack: bool = True
    runs: int = 50
    warmup: int = 5
    workdir: str | None = None       # remote parent of the temporary folder (/tmp, /data/local/tmp)
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 600.0
    description: str = ""
    budgets: dict[str, Budget] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.transport == "ssh" and not self.host:
            raise ValueError("an ssh profile needs host")
        if self.transport == "adb" and not (self.python or self.benchmark_model):
            raise ValueError("an adb profile needs python (the device's Python) or benchmark_model (a binary)")
        for key in ("threads", "runs"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be an integer >= 1")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError("warmup must be an integer >= 0")
        if self.exec_prefix and (self.transport != "local" or not self.python):
            raise ValueError("exec_prefix is for the local transport, with python (the interpreter it runs)")
        if not all(isinstance(w, str) and w for w in self.exec_prefix):
            raise ValueError("exec_prefix must be a list of non-empty strings")
        if not isinstance(self.emulated, bool):
            raise ValueError("emulated must be true or false")
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise ValueError("workdir must be an absolute path on the device")
        if self.connect_timeout_s <= 0 or self.command_timeout_s <= 0:
            raise ValueError("timeouts must be positive")


def profile_dirs() -> list[Path]:
    dirs = [Path(p).expanduser() for p in os.environ.get("XEDGE_DEVICES", "").split(os.pathsep) if p]
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [*dirs, config / "xedge" / "devices", PACKAGED]


def parse_profile(data: dict, name: str, source: str | None = None) -> DeviceProfile:
    data = dict(data)
    if data.pop("name", name) != name:
        raise DeviceError(f"profile {source or name}: name must match the file name ({name})")
    known = {f.name for f in fields(DeviceProfile)} - {"name", "source", "budgets"}
    unknown = sorted(set(data) - known - {"budgets"})
    if unknown:
        raise DeviceError(f"profile {source or name}: unknown keys {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known | {'budgets'}))})")
    budgets = {}
    for model, spec in (data.pop("budgets", None) or {}).items():
        if not isinstance(spec, dict) or set(spec) - {"p50_ms", "p90_ms", "path"}:
            raise DeviceError(f"profile {source or name}: [budgets.{model}] takes p50_ms, p90_ms and path")
        try:
            budgets[model] = Budget(**spec)
        except ValueError as exc:
            raise DeviceError(f"profile {source or name}: [budgets.{model}]: {exc}") from None
    prefix = data.get("exec_prefix")
    if isinstance(prefix, list):
        data["exec_prefix"] = _resolve_prefix(prefix)
    try:
        return DeviceProfile(name=name, budgets=budgets, source=source, **data)
    except (ValueError, TypeError) as exc:
        raise DeviceError(f"profile {source or name}: {exc}") from None


def _resolve_prefix(prefix: list) -> tuple:
    """A relative path as the first word names a launcher shipped in this package (``arm64/board``), so a copy
    of a shipped profile in any folder still finds it."""
    words = tuple(prefix)
    first = words[0] if words else None
    if isinstance(first, str) and "/" in first and not os.path.isabs(first):
        words = (str(PACKAGED.parent / first), *words[1:])
    return words


def load_profile_file(path: str | os.PathLike) -> DeviceProfile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DeviceError(f"cannot read device profile {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DeviceError(f"device profile {path} is not valid TOML: {exc}") from None
    return parse_profile(data, path.stem, str(path))


def available_profiles() -> dict[str, Path]:
    """Name -> file; a user folder's profile hides a packaged one of the same name."""
    found: dict[str, Path] = {}
    for folder in profile_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                found.setdefault(path.stem, path)
    return found


def load_profile(name: str | None) -> DeviceProfile:
    """A profile by name (or a path to a .toml); no name is the build machine (``local``)."""
    name = name or "local"
    if name.endswith(".toml") or os.sep in name:
        return load_profile_file(name)
    profiles = available_profiles()
    if name not in profiles:
        where = ", ".join(str(d) for d in profile_dirs())
        raise DeviceError(f"no device profile {name!r}; known: {', '.join(sorted(profiles)) or 'none'} "
                          f"(searched {where}; set $XEDGE_DEVICES to add a folder)")
    return load_profile_file(profiles[name])
