# Pointsman: the two commands are `make demo` and `make test`; both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install demo up test lint protos check-protos bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install
	$(VENV)/bin/pointsman demo

up: install
	$(VENV)/bin/pointsman up

protos: install
	PYTHON=$(PY) scripts/gen_protos.sh

# Fails when the checked-in stubs differ from what `make protos` generates.
check-protos: install
	@tmp=$$(mktemp -d) && cp -r pointsman/router $$tmp/before && \
	  PYTHON=$(PY) scripts/gen_protos.sh && \
	  if ! diff -r $$tmp/before pointsman/router >/dev/null; then \
	    diff -r $$tmp/before pointsman/router | head -20; \
	    echo "generated stubs are stale: run 'make protos' and commit"; rm -rf $$tmp; exit 1; fi; \
	  rm -rf $$tmp; echo "protos: stubs are fresh"

lint: install check-protos
	$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check pointsman router sidecar tests bench triton_models
	$(VENV)/bin/mypy pointsman router sidecar

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/sidecar_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
