"""Differential privacy: client-level DP-FedAvg with fixed or adaptive clipping, privacy
accounting with opacus' accountants, and example-level DP-SGD inside a client."""
