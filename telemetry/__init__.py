"""Telemetry: metrics, resources, prediction logs, quality and drift, the spool, payloads."""
