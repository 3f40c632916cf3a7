"""Update validation: a NaN, wrongly shaped, wrongly typed, incomplete or huge update is dropped
with the client id and reason, and the others go on."""

from __future__ import annotations

import torch

from atoll.privacy.validation import Rejection, check_update, expected_parts, filter_updates


def reference() -> dict[str, torch.Tensor]:
    return {"lora.q.A": torch.zeros(4, 8), "lora.q.B": torch.zeros(8, 4), "extra.head": torch.zeros(3, 8)}


def good(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in reference().items()}


def test_bad_updates_are_dropped_with_reasons_and_the_rest_kept():
    expected = expected_parts(reference())
    uploads = {client: good(client) for client in range(7)}
    uploads[1]["lora.q.A"][2, 3] = float("nan")
    uploads[2]["lora.q.B"] = torch.zeros(8, 5)
    uploads[3]["extra.head"] = uploads[3]["extra.head"] * 1e6
    uploads[4]["lora.q.A"] = uploads[4]["lora.q.A"].double()
    del uploads[5]["extra.head"]
    uploads[6]["extra.router"] = torch.zeros(2)
    accepted, rejected = filter_updates(uploads, expected, max_part_norm=100.0)
    assert accepted == [0]
    assert rejected == [
        Rejection(1, "part 'lora.q.A' has NaN or Inf values"),
        Rejection(2, "part 'lora.q.B' has shape (8, 5), expected (8, 4)"),
        Rejection(3, rejected[2].reason),
        Rejection(4, "part 'lora.q.A' has dtype torch.float64, expected torch.float32"),
        Rejection(5, "missing part 'extra.head'"),
        Rejection(6, "unexpected part 'extra.router'"),
    ]
    assert rejected[2].reason.startswith("part 'extra.head' has L2 norm") and "above the bound 100" in rejected[2].reason


def test_without_a_norm_bound_only_structure_and_finiteness_are_checked():
    expected = expected_parts(reference())
    big = {k: v * 1e6 for k, v in good(0).items()}
    assert check_update(big, expected) is None
    big["extra.head"][0, 0] = float("inf")
    assert check_update(big, expected) == "part 'extra.head' has NaN or Inf values"
