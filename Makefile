# Two entry points; each creates or refreshes the virtual environment it needs in .venv:
#   make demo   - the 30-second demo (core install only, no TensorFlow)
#   make test   - mypy --strict (configured in pyproject.toml), the gcs tests with the oldest gcsfs
#                 the gcs extra allows, then the whole test
#                 suite (installs the test extras: emulators, TensorFlow, ...)
#   make bench  - the benchmark harness against tensorflow_hub and tar (1 GiB, ~6 minutes)
PYTHON ?= python3
VENV   ?= .venv
# pytest-xdist workers for the main suite: most of its time is spent waiting (lease TTLs, child
# processes, servers), so two workers on two cores halve the wall time. JOBS=0 runs in-process.
JOBS   ?= 2
PY     := $(VENV)/bin/python

.PHONY: demo test test-gcs-floor bench venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install when the project's metadata changes (new dependencies, entry points).
$(VENV)/.core: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml examples/hubcache-s3/setup.cfg | $(PY)
	$(PY) -m pip install --quiet -e '.[test]' -e examples/hubcache-s3
	touch $@ $(VENV)/.core

$(VENV)/.bench: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

venv: $(VENV)/.test

demo: $(VENV)/.core
	$(PY) examples/demo.py

# At the floor, the gcs tests that time the lease protocol or replay the kit's multi-process and
# tier-chain scenarios are left out: the primitives they rest on (conditional create, replace,
# delete and versioned upload) are tested there by the conformance suite and every resolve.
FLOOR_SKIP := not (request_rate or stalled_holder or stalled_writer or tier_chain or upload_killed or takeover_after_holder_is_killed or judges_a_lease or heartbeat_at_most or fleet_takes)

test: $(VENV)/.test
	$(PY) -m mypy
	PYTHON=$(PYTHON) scripts/test_gcs_floor.sh -k "$(FLOOR_SKIP)"
	$(PY) -m pytest -n $(JOBS)

# The gcs extra's floor (the oldest gcsfs it allows) in a venv of its own, reused while
# pyproject.toml is unchanged: `test` runs this first (the main suite's floor scenario reads that
# venv), then the whole suite with the newest gcsfs (in .venv).
test-gcs-floor:
	PYTHON=$(PYTHON) scripts/test_gcs_floor.sh

bench: $(VENV)/.bench
	$(PY) benchmarks/run.py --publish

clean:
	rm -rf $(VENV) build src/*.egg-info
