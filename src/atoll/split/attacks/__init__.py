"""Attacks of the honest-but-curious model party (see base.py for the seam)."""
