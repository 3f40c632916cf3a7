"""Hybrid edge–cloud inference: a small personal model on the device fuses its next-token
distribution with a black-box cloud LLM's top-k log-probabilities, token by token, under a
deadline (the setting of Floe, Tian et al., arXiv 2602.14302, 2026).

Layers, bottom up: ``tokens`` (token surface bytes), ``vocab`` (edge <-> cloud alignment through
shared token strings), ``fusion`` (the rules, pure tensor math), ``privacy`` (what may leave the
device), ``server`` / ``client`` (the OpenAI-compatible wire), ``edge`` (the on-device model),
``decoding`` (the per-token loop with its deadline), ``evaluate`` / ``chat`` / ``cli`` (commands).
"""
