# Set-up and the two README commands. `make demo` and `make test` create .venv from the pinned lock file first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-ray test-fast ci install bench clean docs browser-deps ray-deps

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/homflow demo

# The default run (README): every test not marked slow, under 15 minutes on 2 cores. A test that hangs fails after
# TEST_TIMEOUT seconds with its stack (pytest-timeout) instead of holding the run.
TEST_TIMEOUT ?= 600
SLOW_TIMEOUT ?= 1800
test: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" --timeout $(TEST_TIMEOUT)

# The slower mathematical checks (built-in grids, real browser, real Ray cluster, long flows); CI runs them too.
test-slow: $(STAMP) browser-deps
	$(PY) -m pytest -n 2 -q -m "slow and not ray_cluster" --timeout $(SLOW_TIMEOUT)

# The Ray backend on a real local head on 127.0.0.1 (a sweep and a census, one Ray task process SIGKILLed mid-run);
# installs Ray (the optional extra homflow[ray]) first. CI runs it.
test-ray: $(STAMP) ray-deps
	$(PY) -m pytest -n 0 -q -m ray_cluster --timeout $(SLOW_TIMEOUT)

test-fast: test

# What CI runs (.ci/run): the default run, the slow checks, the real Ray cluster and the docs site (warnings as errors).
ci: test test-slow test-ray docs

bench: $(STAMP)
	$(PY) benchmarks/flow_cost.py

# The docs site (warnings are errors); tests/test_docs.py builds it too and executes the tutorials.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Debian's Chromium for tests/test_browser.py (the reports rendered in a real browser), if it is missing.
browser-deps:
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Ray is an optional extra (homflow[ray]); the tests run a real local cluster, so CI installs it.
ray-deps: $(STAMP)
	$(PY) -c "import ray" 2>/dev/null || $(PY) -m pip install -q ray==2.60.0

clean:
	rm -rf $(VENV) .pytest_cache site
