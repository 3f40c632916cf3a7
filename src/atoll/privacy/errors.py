"""Errors raised by protections: each is one line saying what failed and how to fix it."""

from __future__ import annotations

from atoll.errors import AtollError


class SecureAggregationError(AtollError):
    """A secure-aggregation round cannot complete (too few clients left, a malformed message).

    The round fails as a whole: nothing of a partial sum is released.
    """

    kind = "secure aggregation error"


class PrivacyBudgetError(AtollError):
    """Differential-privacy settings that cannot hold (budget spent, impossible noise split)."""

    kind = "privacy error"
