# finemoe: `make demo` runs the whole pipeline on the embedded defaults, `make test` the test suite.
#
# Inside an active virtual environment the targets use it; outside one they create and use .venv,
# since Debian/Ubuntu's system Python refuses `pip install` ("externally managed"). VENV=path picks
# another folder.
ifdef VIRTUAL_ENV
VENV ?= $(VIRTUAL_ENV)
else
VENV ?= .venv
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Re-installed only when the package's requirements change.
STAMP := $(VENV)/.finemoe-installed

.PHONY: install demo test test-slow lint bench clean

$(PY):
	@python3 -m venv $(VENV) || { echo "error: 'python3 -m venv' failed; install your distribution's venv package (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }

$(STAMP): pyproject.toml | $(PY)
	# torch first, pinned: here it is a local CPU wheel; a looser spec would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,ray]'
	@touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/finemoe demo -o demo-out

# One worker per core (pytest-xdist), each test file kept on one worker so its fixtures are built
# once; a running percentage as it goes, the slowest tests listed at the end.
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n auto --dist loadfile --durations=10

# The long property runs (thousands of random cases) that `make test` leaves out.
test-slow: install
	HF_HUB_OFFLINE=1 FINEMOE_SLOW_PROPERTIES=1 $(PY) -m pytest -m bounds_slow tests/test_bounds_properties.py

lint: install
	$(VENV)/bin/ruff check finemoe tests benchmarks

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf demo-out build *.egg-info .pytest_cache
