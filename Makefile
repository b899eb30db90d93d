.PHONY: setup test lint demo bench schemas clean check-aarch64 install uninstall

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh

# As root on the device: the service user, /opt/inferd venv, /etc/inferd, the systemd unit.
# Pass options through, e.g. make install INSTALL_ARGS="--trusted-root root.json".
install:
	bash systemd/install.sh $(INSTALL_ARGS)

uninstall:
	bash systemd/install.sh --uninstall $(INSTALL_ARGS)

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

demo:
	bash scripts/demo.sh

bench: setup
	.venv/bin/python bench/run.py

schemas: setup
	.venv/bin/python -m telemetry.schemas

clean:
	rm -rf .venv build *.egg-info .mypy_cache .ruff_cache .pytest_cache demo-state

# DESIGN §3: the dependency set must resolve on aarch64 (Pi OS bookworm 3.11, JetPack 6 3.10).
# onnxruntime >= 1.17 publishes manylinux_2_27/2_28 aarch64 wheels only, hence the extra tags.
check-aarch64: setup
	for py in 3.10 3.11; do \
	  .venv/bin/pip install --dry-run --quiet --only-binary=:all: --ignore-installed \
	    --platform manylinux2014_aarch64 --platform manylinux_2_27_aarch64 \
	    --platform manylinux_2_28_aarch64 --python-version $$py \
	    --target "$$(mktemp -d)" ".[tflite]" || exit 1; \
	  echo "aarch64 python $$py: resolves"; \
	done
