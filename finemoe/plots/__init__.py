"""Figures and reports from result files (and traces) only."""
