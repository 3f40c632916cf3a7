"""Hybrid inference tests (a package, so its conftest is imported as hybrid.conftest and never shadows tests/conftest.py)."""
