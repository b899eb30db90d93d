.PHONY: setup test lint demo bench soak schemas clean install uninstall

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

soak: setup
	.venv/bin/pytest -q -m soak

clean:
	rm -rf .venv build *.egg-info .mypy_cache .ruff_cache .pytest_cache demo-state
