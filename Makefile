# finemoe: `make demo` runs the whole pipeline on the embedded defaults, `make test` the test suite.
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install demo test lint bench clean

install:
	# torch first, pinned: here it is a local CPU wheel; a looser spec would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'

demo: install
	finemoe demo -o demo-out

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint:
	ruff check finemoe tests benchmarks

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf demo-out build *.egg-info .pytest_cache
