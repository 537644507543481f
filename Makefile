# mrpcd: two set-up commands, `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SOURCES := pyproject.toml setup.py $(wildcard native/*.c native/*.h native/_ring_build.py marshal/*.pyx transports/*.pyx)

.PHONY: install demo test clean

install: $(STAMP)

# A fresh venv, the build tools, then an editable install (which compiles the Cython and
# cffi extensions in place) with the test extras.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cython cffi
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	$(PY) setup.py -q build_ext --inplace
	touch $(STAMP)

demo: install
	$(PY) examples/hello/demo.py

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
	find . -name '*.so' -not -path './$(VENV)/*' -delete
	rm -f marshal/_framing.c transports/_tcp.c
