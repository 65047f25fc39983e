#!/usr/bin/env bash
# Regenerates the Python stubs of protos/ into pointsman/ (the one documented command:
# `make protos`). Output depends on the pinned grpcio-tools version in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
find pointsman/router -name '*_pb2*.py*' -delete 2>/dev/null || true
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  $(cd protos && find . -name '*.proto' | sed 's|^\./||' | sort | sed 's|^|protos/|')
for d in pointsman/router pointsman/router/v1; do
  [ -f "$d/__init__.py" ] || echo '"""Generated from protos/ by scripts/gen_protos.sh."""' > "$d/__init__.py"
done
