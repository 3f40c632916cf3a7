"""Split learning of language models (placeholder docstring, completed below)."""
