"""Scoring a finished run on a split: metrics with confidence intervals, time-resolved metrics, error review."""
