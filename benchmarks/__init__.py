"""Benchmarks of the CVPO update and its E-step dual solver (see benchmarks/README.md).

Run from the repository root, e.g. ``python -m benchmarks.update_step``.
"""
