"""Defenses of the data party (see base.py for the seam)."""
