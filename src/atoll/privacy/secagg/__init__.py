"""Secure aggregation after Bonawitz et al. (CCS 2017): the server learns only the sum."""
