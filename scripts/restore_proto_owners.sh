#!/usr/bin/env sh
# xds-protos ships its own, older copies of modules that belong to opentelemetry-proto and
# googleapis-common-protos (grpc/grpc#42926, #42830). pip lets whichever installs last own the
# files, and the stale opentelemetry ones break the OTLP exporters (no InstrumentationScope).
# Reinstall the owners' own files, same versions, no dependency changes. Usage: PYTHON=... $0
set -eu
PYTHON="${PYTHON:-python3}"
pins=$("$PYTHON" - <<'PY'
from importlib.metadata import PackageNotFoundError, version
for name in ("opentelemetry-proto", "googleapis-common-protos"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
PY
)
[ -z "$pins" ] || "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps \
  --force-reinstall $pins
