.PHONY: setup test coverage lint demo bench bench-peers schemas clean lock check-latest check-oldest check-arm64 check-gpu install uninstall

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh

# The test suite under coverage (subprocesses too: .coveragerc), its report and the floor;
# `make test` does the same (COVERAGE=0 bash scripts/test.sh runs without coverage).
coverage:
	COVERAGE=1 bash scripts/test.sh

# As root on the device: the service user, /opt/inferd venv, /etc/inferd, the systemd unit.
# Pass options through, e.g. make install INSTALL_ARGS="--trusted-root root.json".
install:
	bash systemd/install.sh $(INSTALL_ARGS)

uninstall:
	bash systemd/install.sh --uninstall $(INSTALL_ARGS)

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy && \
	  .venv/bin/lint-imports --no-cache

demo:
	bash scripts/demo.sh

bench: setup
	.venv/bin/python -m bench.run

# Opt-in, never in CI or `make bench`: Seldon MLServer in a throwaway venv (build/, not the lock)
# beside inferd, same models and client; the overhead ratio goes into bench/results.json.
bench-peers: setup
	.venv/bin/python -m bench.peers

schemas: setup
	.venv/bin/python -m telemetry.schemas

clean:
	rm -rf .venv build *.egg-info .mypy_cache .ruff_cache .pytest_cache demo-state

# The lock (uv.lock, exported to requirements/*.txt with hashes): refresh it, keeping pins that
# still fit (UPGRADE=1: newest allowed versions). Commit the result.
lock:
	bash scripts/lock.sh

# The tests against the newest versions pyproject.toml allows (Python 3.13), not the lock:
# drift upstream shows here before a lock refresh, never first to a new user.
check-latest:
	bash scripts/check-deps.sh latest

# The tests against the lowest version of every direct dependency (Python 3.10): the lower
# bounds in pyproject.toml are true.
check-oldest:
	bash scripts/check-deps.sh oldest

# The device install on real arm64 Debian userland under qemu (bookworm/Python 3.11 and
# trixie/Python 3.13): install from the lock, serve, infer, status on MQTT, a signed update.
check-arm64:
	bash scripts/check-arm64.sh

# On an NVIDIA GPU host or a Jetson, by hand (never in CI; not yet run on a GPU): the gpu extra
# from the lock plus TensorRT, the demo and zoo models on [tensorrt, cuda, cpu] and [cuda, cpu]
# against the CPU, the TensorRT engine cache, the validation gate and a hot swap, one table.
# Pass options through, e.g. make check-gpu CHECK_GPU_ARGS="--jetson-index URL" (or --dry-run).
check-gpu:
	bash scripts/check-gpu.sh $(CHECK_GPU_ARGS)
