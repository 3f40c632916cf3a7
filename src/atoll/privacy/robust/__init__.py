"""Byzantine-robust aggregation rules on flat client updates (one row per client)."""
