"""Telemetry: metrics, resource sampling, prediction logs, quality and drift, the spool, payloads."""
