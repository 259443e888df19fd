# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3.11
# The interpreters pyproject.toml's requires-python admits: >= PYTHON_MIN, < PYTHON_BELOW
# (tomllib needs 3.11, tarfile's extraction filter 3.11.4; tests/test_project.py keeps the two equal).
PYTHON_MIN := 3.11.4
PYTHON_BELOW := 3.13
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The runner under the oldest runtime it supports: a venv holding only numpy<2 and tflite-runtime 2.14,
# used by tests/devices/test_runner.py. tflite-runtime 2.14 has wheels for Python 3.8 to 3.11 only.
RUNTIME_PYTHON ?= python3.11
TFLITE_RUNTIME := .cache/tflite-runtime-2.14
# The emulated aarch64 board (devices/arm64/): Debian's arm64 Python under qemu-user, one venv per runtime.
ARM64_BOARD := .cache/arm64-board

.PHONY: install demo test test-fast bench clean system-deps check-python tflite-runtime arm64-board

install: $(STAMP)

CHECK_PYTHON = v=$$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null) \
	|| { echo "error: $(PYTHON) not found; install Python $(PYTHON_MIN) or later (below $(PYTHON_BELOW)), or run make PYTHON=python3.12"; exit 2; }; \
	if [ "$$(printf '%s\n' "$$v" $(PYTHON_MIN) | sort -V | head -n 1)" != "$(PYTHON_MIN)" ] \
	   || [ "$$(printf '%s\n' "$$v" $(PYTHON_BELOW) | sort -V | head -n 1)" != "$$v" ]; then \
		echo "error: $(PYTHON) is Python $$v; xception-edge needs Python >= $(PYTHON_MIN) and < $(PYTHON_BELOW) (make PYTHON=... chooses another)"; exit 2; \
	fi

check-python:
	@$(CHECK_PYTHON)

# Reinstall only when the dependency list changes; the project itself is editable.
# MediaPipe, the tests' on-device client, declares absl-py~=2.3 where tensorflow-model-optimization 0.8.1
# declares absl-py~=1.2: no resolver takes both, so it goes in without its dependencies (its image classifier
# runs with absl-py 1.4), plus the OpenCV its vision module imports.
MEDIAPIPE := mediapipe>=1.2.2,<1.3
$(STAMP): pyproject.toml
	@$(CHECK_PYTHON)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps '$(MEDIAPIPE)'
	$(PY) -m pip install --quiet 'opencv-contrib-python>=4.10'
	touch $(STAMP)

# System packages used by the tests: a real sshd, a real headless browser, and mount/umount for the
# read-only tmpfs (which also needs root). Under .ci/run (XEDGE_REQUIRE_ALL=1) a missing one stops the run.
system-deps:
	@missing=""; \
	command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v mount >/dev/null 2>&1 && command -v umount >/dev/null 2>&1 || missing="$$missing mount"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		elif [ "$${XEDGE_REQUIRE_ALL:-}" = 1 ]; then \
			echo "error: missing$$missing; run make system-deps as root (apt-get) to install them"; exit 2; \
		else echo "warning: missing$$missing (tests that need them are skipped; under .ci/run they fail)"; fi; \
	fi

tflite-runtime: $(TFLITE_RUNTIME)/.installed

$(TFLITE_RUNTIME)/.installed:
	@command -v $(RUNTIME_PYTHON) >/dev/null 2>&1 || { echo "error: $(RUNTIME_PYTHON) not found; tflite-runtime 2.14 needs Python 3.8 to 3.11 (make RUNTIME_PYTHON=...)"; exit 2; }
	$(RUNTIME_PYTHON) -m venv --clear $(TFLITE_RUNTIME)
	$(TFLITE_RUNTIME)/bin/python -m pip install --quiet 'numpy<2' tflite-runtime==2.14.0
	touch $@

# Built once (apt, dpkg -x, aarch64 wheels, about 2 minutes), then kept: the stamp is written only after the board's
# self-check passed, and the launcher (devices/arm64/board) serves only with it. Needs root (apt-get, unshare -m).
arm64-board: $(ARM64_BOARD)/.installed

$(ARM64_BOARD)/.installed: | $(STAMP)
	devices/arm64/build.sh $(ARM64_BOARD) $(PY)

demo: install
	$(VENV)/bin/xedge demo --out demo-out

test: install system-deps tflite-runtime arm64-board
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) demo-out build *.egg-info .pytest_cache
