"""Benchmarks, each run as ``python -m bench.X [--json]`` from the repository root; ``make bench``
runs them all through ``bench.run``. Builders (models, brokers, daemons) come from
``tests.support``, shared with the tests."""
