"""Typed messages: LoRA factors (A and B each optional), other trainable tensors and the
algorithm's control data are told apart in memory and on the wire, without knowing the algorithm."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from atoll.errors import UpdateError
from atoll.fl.state import AdapterState, LoRAFactors


def state(rank: int = 3) -> AdapterState:
    gen = torch.Generator().manual_seed(0)
    lora = {m: LoRAFactors(torch.randn(rank, 5, generator=gen), torch.randn(4, rank, generator=gen), 2.0 / rank) for m in ("q", "v")}
    return AdapterState(lora, {"head.weight": torch.randn(2, 4, generator=gen)}, {}, {"scaffold.c.x": torch.ones(3)})


def test_a_partial_message_keeps_ranks_and_costs_no_payload_for_the_absent_factor():
    full = state()
    only_b = full.without("A")
    assert all(f.A is None and f.rank == 3 for f in only_b.lora.values()) and only_b.rank() == 3
    assert not only_b.control, "a partial message carries model data only"
    decoded = AdapterState.from_tensors(only_b.to_tensors())
    assert all(f.A is None and torch.equal(f.B, only_b.lora[n].B) for n, f in decoded.lora.items())
    assert only_b.nbytes() == len(save(only_b.to_tensors()))
    payload = sum(t.numel() * t.element_size() for t in only_b.to_tensors().values())
    assert payload == sum(f.B.numel() * 4 + 8 for f in full.lora.values()) + 2 * 4 * 4  # B, scales, head: no A bytes
    rebuilt = decoded.completed(full, "A")
    assert all(torch.equal(rebuilt.lora[n].A, full.lora[n].A) for n in full.lora)


def test_model_tensors_are_the_factors_present_and_the_trainable_tensors_never_control_data():
    message = state().without("B")
    message.control["digest"] = torch.zeros(4, dtype=torch.uint8)
    assert sorted(message.model_tensors()) == ["extra.head.weight", "lora.q.A", "lora.v.A"]
    wire = message.to_tensors()
    assert "control.digest" in wire and AdapterState.from_tensors(wire).control.keys() == {"digest"}


def test_a_full_adapter_keeps_the_v1_wire_keys_so_byte_counts_do_not_change():
    full = state()
    full.control = {}
    assert sorted(full.to_tensors()) == sorted(["extra.head.weight"] + [f"lora.{m}.{p}" for m in ("q", "v") for p in ("A", "B", "s")])


def test_malformed_messages_are_update_errors():
    with pytest.raises(UpdateError, match="unknown kind"):
        AdapterState.from_tensors({"other.x": torch.zeros(1)})
    empty = {"lora.q.A": torch.zeros(3, 0), "lora.q.B": torch.zeros(0, 3), "lora.q.s": torch.tensor(1.0, dtype=torch.float64)}
    with pytest.raises(UpdateError, match="neither A nor B"):
        AdapterState.from_tensors(empty)
    with pytest.raises(UpdateError, match="without both factors"):
        state().without("A").lora["q"].delta()
