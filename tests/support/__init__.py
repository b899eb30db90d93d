"""Builders and process starters shared by the tests and by ``bench/``; imports no pytest.

Real ONNX and TFLite models built in code, a private mosquitto, an ``inferd run`` process, a
signed TUF repository on a real HTTP server, a throwaway PKI, an sd_notify listener. The pytest
fixtures in ``tests/fixtures/`` wrap these (start in setup, stop in teardown); ``python -m
bench.X`` uses them directly, so nothing here may import pytest (a unit test checks).
"""
