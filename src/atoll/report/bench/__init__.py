"""`atoll bench`: the algorithm comparison of docs/algorithms.md (suite, learning-rate sweep, runs,
statistics, tables and curves)."""
