"""The bottom layer: errors, tensor vocabulary, runtime options and backends, model bundles.

Imports nothing of the rest of inferd, so the device and the operator side share it.
"""
