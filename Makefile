# Pointsman: the two commands are `make demo` and `make test`; both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
PROMTOOL ?= promtool

.PHONY: install demo up test lint protos check-protos check-ops bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	PYTHON=$(PY) scripts/restore_proto_owners.sh
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
	  if ! diff -r -x __pycache__ $$tmp/before pointsman/router >/dev/null; then \
	    diff -r -x __pycache__ $$tmp/before pointsman/router | head -20; \
	    echo "generated stubs are stale: run 'make protos' and commit"; rm -rf $$tmp; exit 1; fi; \
	  rm -rf $$tmp; echo "protos: stubs are fresh"

# The operations bundle (ops/): metric names and labels against the code, dashboard queries,
# alert rules and their unit tests. promtool comes with Debian's `prometheus` package; without
# it the promtool half is skipped, except in CI (CI=true), where that is an error.
check-ops: install
	@$(PY) ops/check_names.py
	@if command -v $(PROMTOOL) >/dev/null 2>&1; then \
	  tmp=$$(mktemp -d) && $(PY) ops/check_names.py --dashboard-rules $$tmp/dashboard-queries.yaml && \
	  $(PROMTOOL) check config ops/prometheus/prometheus.yml >/dev/null && \
	  $(PROMTOOL) check rules ops/prometheus/alerts.yaml $$tmp/dashboard-queries.yaml >/dev/null && \
	  $(PROMTOOL) test rules ops/prometheus/alerts_test.yaml >/dev/null; \
	  rc=$$?; rm -rf $$tmp; \
	  if [ $$rc -ne 0 ]; then echo "ops: promtool failed; run the promtool commands in ops/README.md"; exit $$rc; fi; \
	  echo "ops: promtool: config, alert rules, dashboard queries and rule unit tests pass"; \
	elif [ "$$CI" = true ]; then \
	  echo "ops: $(PROMTOOL) not found, and CI=true: install Debian's prometheus package (.ci/run does)"; exit 1; \
	else \
	  echo "ops: $(PROMTOOL) not found: alert rules NOT checked (apt-get install prometheus)"; \
	fi

lint: install check-protos check-ops
	$(VENV)/bin/buf lint
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check pointsman router sidecar app bench tests triton_models ops
	$(VENV)/bin/mypy pointsman router sidecar app bench ops/check_names.py

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Every scenario of pointsman bench (about 5 hours): results.json/.md/.png in ./pointsman-bench-TIME/.
bench: install
	$(VENV)/bin/pointsman bench --scenario all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
