#!/bin/sh
# Regenerate the chart's copy of the runner's exit-code table (read by the
# Job's podFailurePolicy). tests/test_helm.py fails while it is stale.
set -eu
cd "$(dirname "$0")/.."
python -m runner.errors json > helm/migration-runner/files/exit-codes.json
