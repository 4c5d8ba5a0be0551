"""Regression checks: the machine class and the per-step calibration (calibrate.py), and the
comparison of a run against a stored baseline (compare.py)."""
