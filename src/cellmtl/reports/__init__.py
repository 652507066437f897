"""Plots (PNG) and the run page (HTML) a person reads."""
