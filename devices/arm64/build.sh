#!/usr/bin/env bash
# Build the emulated aarch64 board (`make arm64-board`): usage: build.sh BOARD_DIR HOST_PYTHON
#
# Everything comes from the package registries, nothing is compiled: qemu-user-static and Debian's own arm64
# Python 3.11 with its libraries (apt-get download, unpacked with dpkg -x; no chroot, no binfmt: the launcher
# runs qemu-aarch64-static with QEMU_LD_PREFIX), one aarch64 /proc/cpuinfo per emulated core, and one venv per
# runtime a board can install, filled from the aarch64 wheels on PyPI. The board then checks itself
# (devices/arm64/selfcheck.py) and the stamp that lets the launcher serve is written only when it passes.
set -euo pipefail

BOARD=${1:?usage: build.sh BOARD_DIR HOST_PYTHON}
HOST_PY=${2:?usage: build.sh BOARD_DIR HOST_PYTHON}
HERE=$(cd "$(dirname "$0")" && pwd -P)
ROOT=$(cd "$HERE/../.." && pwd)

# Debian 12's python3.11 is the board's Python: the interpreter a Raspberry Pi OS (bookworm) board has, and
# one that every runtime below has cp311 wheels for (tflite-runtime 2.14 stops at 3.11).
PYVER=3.11
DEBS=(libc6 libgcc-s1 libstdc++6 gcc-12-base zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0
      libncursesw6 libtinfo6 libreadline8 libuuid1 libdb5.3 libcrypt1 libnsl2 libtirpc3 libgssapi-krb5-2
      libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 libcom-err2
      "python$PYVER-minimal" "libpython$PYVER-minimal" "libpython$PYVER-stdlib" "python$PYVER")
# name|pip requirements: one venv per runtime, as a board owner would install it.
RUNTIMES=("ai-edge-litert-2.3|ai-edge-litert==2.3.0 numpy"
          "ai-edge-litert-1.4|ai-edge-litert==1.4.0 numpy"
          "tflite-runtime-2.14|tflite-runtime==2.14.0 numpy<2")

die() { echo "error: $*" >&2; exit 2; }
step() { echo "arm64-board: $*"; }

system_packages() {
    command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 \
        || die "the arm64 board is built from Debian's packages: this machine has no apt-get/dpkg"
    [ "$(id -u)" = 0 ] || die "building the arm64 board needs root (apt-get install qemu-user-static, dpkg --add-architecture arm64)"
    if ! command -v qemu-aarch64-static >/dev/null 2>&1; then
        step "installing qemu-user-static"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null
    fi
    dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
    offered || apt-get update -qq
    offered || die "apt offers no python$PYVER for arm64 here (Debian 12 bookworm does; see docs/devices.md)"
}

offered() {  # apt has a python$PYVER:arm64 candidate (read whole: grep -q would cut apt-cache off under pipefail)
    local policy
    policy=$(apt-cache policy "python$PYVER:arm64" 2>/dev/null)
    [[ $policy == *"Candidate: "[0-9]* ]]
}

userland() {
    step "Debian arm64 userland (python$PYVER and its libraries)"
    mkdir -p "$BOARD/debs" "$BOARD/root"
    (cd "$BOARD/debs" && apt-get download -o APT::Sandbox::User=root "${DEBS[@]/%/:arm64}" >/dev/null)
    for deb in "$BOARD"/debs/*.deb; do dpkg -x "$deb" "$BOARD/root"; done
    QEMU_CPU=cortex-a72 QEMU_LD_PREFIX="$BOARD/root" qemu-aarch64-static "$BOARD/root/usr/bin/python$PYVER" -I \
        -c 'import platform, ssl, sqlite3, ctypes; assert platform.machine() == "aarch64"' \
        || die "Debian's arm64 python$PYVER does not start under qemu-aarch64-static"
}

# cpuinfo CORE PART VARIANT REVISION FEATURES: what an aarch64 kernel shows for that core, one entry per CPU of
# this machine (the emulated threads run on them). ai-edge-litert 2.3 crashes creating its interpreter when it
# reads the host's x86 /proc/cpuinfo; the launcher bind-mounts this one instead. "Model" names the emulator,
# so every runner result says the CPU was emulated.
cpuinfo() {
    local core=$1 part=$2 variant=$3 revision=$4 features=$5 i
    {
        for ((i = 0; i < $(nproc --all); i++)); do
            printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$features"
            printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$variant" "$part" "$revision"
        done
        printf 'Model\t\t: %s emulated by %s\n' "$core" "$(qemu-aarch64-static --version | head -n 1 | cut -d' ' -f1-3)"
    } > "$BOARD/cpuinfo/$core"
}

cores() {
    mkdir -p "$BOARD/cpuinfo"
    cpuinfo cortex-a53 0xd03 0x0 4 "fp asimd evtstrm crc32 cpuid"            # Raspberry Pi 3, Zero 2
    cpuinfo cortex-a72 0xd08 0x0 3 "fp asimd evtstrm crc32 cpuid"            # Raspberry Pi 4
    cpuinfo cortex-a76 0xd0b 0x4 1 "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"  # Pi 5
}

runtimes() {
    local glibc platforms=() n entry name venv
    glibc=$(dpkg-deb -f "$BOARD"/debs/libc6_*_arm64.deb Version | sed -E 's/^2\.([0-9]+).*/\1/')
    # every manylinux tag the board's glibc accepts, as pip on the board would (tflite-runtime 2.14 is 2_34)
    for ((n = glibc; n >= 17; n--)); do platforms+=(--platform "manylinux_2_${n}_aarch64"); done
    for entry in "${RUNTIMES[@]}"; do
        name=${entry%%|*}; venv="$BOARD/$name"
        step "venv $name (${entry#*|})"
        mkdir -p "$venv/bin" "$venv/lib/python$PYVER"
        # shellcheck disable=SC2086  # the requirements are words
        "$HOST_PY" -m pip install --quiet --no-warn-conflicts --disable-pip-version-check \
            --target "$venv/lib/python$PYVER/site-packages" "${platforms[@]}" --platform manylinux2014_aarch64 \
            --only-binary=:all: --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" ${entry#*|} \
            2> >(grep -v '^WARNING: Location' >&2)
        ln -sfn "../../root/usr/bin/python$PYVER" "$venv/bin/python"
        printf 'home = %s\ninclude-system-site-packages = false\nversion = %s\n' "$BOARD/root/usr/bin" \
            "$(dpkg-deb -f "$BOARD"/debs/python${PYVER}-minimal_*_arm64.deb Version | cut -d- -f1)" > "$venv/pyvenv.cfg"
    done
}

mkdir -p "$(dirname "$BOARD")"
BOARD=$(cd "$(dirname "$BOARD")" && pwd -P)/$(basename "$BOARD")
exec 9>"$BOARD.lock"
flock 9  # another checkout building the same shared board: wait for it, then find its stamp
if [ -f "$BOARD/.installed" ]; then step "already built: $BOARD"; exit 0; fi
start=$(date +%s)
system_packages
rm -rf "$BOARD"
mkdir -p "$BOARD"
userland
cores
runtimes
step "self-check: reference kernels on the board against this machine's, exactly"
PYTHONPATH="$ROOT" "$HOST_PY" -m devices.arm64.selfcheck "$BOARD" \
    || die "the arm64 board failed its self-check ($BOARD/check.json): it will not serve"
{
    echo "qemu: $(qemu-aarch64-static --version | head -n 1)"
    echo "python: $(readlink "$BOARD/ai-edge-litert-2.3/bin/python")"
    for entry in "${RUNTIMES[@]}"; do echo "${entry%%|*}: ${entry#*|}"; done
} > "$BOARD/.installed"
step "built in $(( $(date +%s) - start )) s: $BOARD"
