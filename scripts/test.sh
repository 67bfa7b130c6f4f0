#!/usr/bin/env bash
# Install everything, then run the whole test suite: lint, types, unit, kernel,
# libvirt, benchmarks (and, from the test-host issue on, the test host).
# Extra arguments go to pytest, e.g. `-m "not bench"` for a quick loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check vhostorch tests ansible/plugins
.venv/bin/ruff format --check vhostorch tests ansible/plugins
.venv/bin/mypy
# --durations: where the time goes, for keeping CI inside its budget.
exec .venv/bin/pytest -s --durations=25 "$@"
