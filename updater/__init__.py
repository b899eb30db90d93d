"""Signed model updates: the device-side TUF client and state machine, and the operator side."""
