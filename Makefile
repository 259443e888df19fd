# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean system-deps

install: $(STAMP)

# Reinstall only when the dependency list changes; the project itself is editable.
# MediaPipe, the tests' on-device client, declares absl-py~=2.3 where tensorflow-model-optimization 0.8.1
# declares absl-py~=1.2: no resolver takes both, so it goes in without its dependencies (its image classifier
# runs with absl-py 1.4), plus the OpenCV its vision module imports.
MEDIAPIPE := mediapipe>=1.2.2,<1.3
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps '$(MEDIAPIPE)'
	$(PY) -m pip install --quiet 'opencv-contrib-python>=4.10'
	touch $(STAMP)

# System packages used by the tests: a real sshd and a real headless browser.
system-deps:
	@missing=""; \
	command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v ssh >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else echo "warning: missing$$missing (tests that need them are skipped)"; fi; \
	fi

demo: install
	$(VENV)/bin/xedge demo --out demo-out

test: install system-deps
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) demo-out build *.egg-info .pytest_cache
