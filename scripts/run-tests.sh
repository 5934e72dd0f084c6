#!/usr/bin/env bash
# Run the test suite from the repository's .venv. Extra arguments go to pytest.
# First the lint: `ruff check` and `ruff format --check` over the whole tree ([tool.ruff] in
# pyproject.toml); a finding stops the run before any test. RLHF_SKIP_LINT=1 skips the lint
# (quick local runs); `make test` and CI run it.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${RLHF_SKIP_LINT:-0}" != "1" ]; then
    if ! .venv/bin/ruff check --quiet . || ! .venv/bin/ruff format --check --quiet .; then
        echo "lint failed: run .venv/bin/ruff check --fix . && .venv/bin/ruff format ."
        exit 1
    fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p artifacts
.venv/bin/python -m pytest --durations=25 "$@"
rc=$?
# pytest exits 5 when it collected no test (e.g. a -m filter that matches nothing): not a failure
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests"
    rc=0
fi
exit "$rc"
