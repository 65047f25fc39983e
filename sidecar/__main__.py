"""`python -m sidecar`: the sidecar without the `pointsman` command around it."""

from __future__ import annotations

import argparse
import sys

from sidecar.main import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sidecar", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
