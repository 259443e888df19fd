"""An emulated aarch64 board on the build machine: the runner on the ISA it is written for, from the registries alone.

``make arm64-board`` runs ``build.sh`` (Debian's arm64 Python and libraries,
qemu-user, one venv per runtime, then ``selfcheck``); ``board`` is the exec
prefix that runs a program on it (the ``arm64-emulated`` device profile).
"""
