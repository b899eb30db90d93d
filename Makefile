.PHONY: setup test lint demo bench soak schemas clean

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

demo:
	bash scripts/demo.sh

bench: setup
	.venv/bin/python bench/run.py

soak: setup
	.venv/bin/pytest -q -m soak

clean:
	rm -rf .venv build *.egg-info .mypy_cache .ruff_cache .pytest_cache demo-state
