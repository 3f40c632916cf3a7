"""``atoll bench security``: an attack x protection matrix of ordinary runs, measured and written to
docs/security.md (matrix: which cells; collect: what each cell measured; render: the table and
plots; cli: the command)."""
