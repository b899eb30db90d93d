#!/usr/bin/env bash
# The test command: lint, format check, type check, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# make check-latest / check-oldest bring their own unlocked .venv
[ -n "${SKIP_SETUP:-}" ] || bash scripts/setup.sh --test
export PATH="$PWD/.venv/bin:$PATH"
# make check-oldest runs the tests only: numpy 1.24's type stubs differ from the locked ones,
# which says nothing about whether inferd works with it
if [ -z "${TESTS_ONLY:-}" ]; then
  echo "== ruff check" && ruff check .
  echo "== ruff format --check" && ruff format --check .
  echo "== mypy" && mypy
  echo "== import contracts" && lint-imports --no-cache
fi
echo "== pytest"
set +e
pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5)"; exit 0
fi
exit "$rc"
