"""Operator-side readers of the wire contract: the fleet view and the rollout tally."""
