"""The wire: what crosses it is exactly what the partition says, every byte is counted, and two
processes over gRPC give the same run as one process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from atoll.split.runner import connect, run_split
from atoll.split.setup import prepare
from atoll.split.wire import Message, decode, encode


def _train(setup, steps: int):
    session = connect(setup, None)
    for _ in range(steps):
        for party in session.parties:
            party.train_step()
    return session


@pytest.mark.parametrize("partition", ["head-tail", "head-body-tail"])
def test_the_model_party_receives_exactly_what_the_partition_says(split_config, llama4_dir, partition):
    extra = {"record.every": 1, "record.phases": "[train, eval]", "model.name": str(llama4_dir), "split.partition": partition}
    if partition == "head-body-tail":
        extra["split.tail_blocks"] = 1
    setup = prepare(split_config(**extra))
    session = _train(setup, 2)
    party = session.parties[0]
    batch = next(iter(setup.data.eval_batches(setup.test_indices[:5], 5)))
    party.infer(batch)
    received = session.model_party.transcript.messages
    assert [m.kind for m in received] == ["forward", "backward", "forward", "backward", "forward"]
    hidden = 64
    for message in received:
        if message.kind == "forward":
            assert set(message.tensors) == {"activations", "attention_mask"}
            activations, mask = message.tensors["activations"], message.tensors["attention_mask"]
            assert activations.dtype == torch.float32 and activations.shape[-1] == hidden
            assert mask.dtype == torch.bool and mask.shape == activations.shape[:2]
            assert set(message.meta) == {"party", "step", "phase"}
        else:
            assert set(message.tensors) == {"output_gradients"}
            gradients = message.tensors["output_gradients"]
            # head-tail: the gradient of the class logits [B, 3]; head-body-tail: of the body's hidden states
            expected = (8, 3) if partition == "head-tail" else (8, mask_width(received, message), hidden)
            assert tuple(gradients.shape) == expected
            assert set(message.meta) == {"party", "step", "phase", "return_gradients"}
    # no token ids and no labels anywhere: the only integer-free tensors besides the mask are floats
    assert all(t.is_floating_point() or t.dtype == torch.bool for m in received for t in m.tensors.values())
    # and at step 1 (before any update) the activations are the head's output, bit for bit
    first = received[0]
    logged = party.batch_log[1]
    step_batch = setup.data.collate(logged)
    fresh = prepare_fresh_head(setup)
    with torch.no_grad():
        clean = fresh.run("head", fresh.embed_tokens(step_batch["input_ids"]), step_batch["attention_mask"])
    assert torch.equal(first.tensors["activations"], clean)
    assert torch.equal(first.tensors["attention_mask"], step_batch["attention_mask"].bool())


def mask_width(received, backward):
    forward = next(m for m in received if m.kind == "forward" and m.step == backward.step)
    return forward.tensors["attention_mask"].shape[1]


def prepare_fresh_head(setup):
    from atoll.split.runner import data_party_model

    model = data_party_model(setup)
    model.train(False)
    return model


def test_every_byte_on_the_wire_is_counted(split_config):
    setup = prepare(split_config())
    session = _train(setup, 3)
    traffic = session.channels[0].traffic
    assert sum(traffic.to_model.values()) == session.model_party.received_bytes
    assert traffic.messages["forward"] == 3 and traffic.messages["backward"] == 3
    # a forward request is the safetensors blob of activations [B, L, d] float32 + mask [B, L] bool + header
    request = encode(Message("forward", {"activations": torch.zeros(8, 24, 64), "attention_mask": torch.ones(8, 24, dtype=torch.bool)}, {}))
    assert len(request) > 8 * 24 * 64 * 4 + 8 * 24
    assert decode(request).tensors["activations"].shape == (8, 24, 64)


def test_bfloat16_wire_halves_the_activation_bytes(split_config):
    full = _train(prepare(split_config()), 1).channels[0].traffic.to_model["forward"]
    half = _train(prepare(split_config(**{"split.wire_dtype": "bfloat16"})), 1).channels[0].traffic.to_model["forward"]
    assert 0.45 < half / full < 0.6


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_two_processes_over_grpc_give_the_one_process_run(tmp_path, split_config):
    """The model party in its own process, on loopback gRPC, two data parties each on its own
    connection, a DP defense drawing noise and an attack on what the model party recorded:
    identical metrics (ε spent included), traffic, adapters and attack results."""
    common = {
        "split.data_parties": 2,
        "defenses": "[{name: gaussian-dp, epsilon: 3000, clip: 5}]",
        "attacks": "[{name: white-box-inversion, steps: 20, lr: 0.1, batches: 1, rows: 2}]",
        "record.limit": 1,
    }
    one_dir, one = run_split(split_config(**common, **{"run.dir": str(tmp_path / "one")}), say=lambda _: None)
    two_dir, two = run_split(split_config(**common, **{"run.dir": str(tmp_path / "two"), "split.transport": "grpc"}), say=lambda _: None)
    assert two["transport"] == "grpc" and (two_dir / "model_party" / "server.log").is_file()
    read = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert _strip(read(one_dir)) == _strip(read(two_dir))
    assert one["final"]["loss"] == two["final"]["loss"] and one["traffic"] == two["traffic"]
    assert two["model_party"]["steps"] == 12  # 6 steps of each data party
    for party in ("data_party_0", "data_party_1", "model_party"):
        a = load_file(str(one_dir / party / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(two_dir / party / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert one["final"]["loss"] != read(one_dir)[0]["eval"]["loss"]  # it trained
    assert one["final"]["defense.gaussian-dp.epsilon"] == two["final"]["defense.gaussian-dp.epsilon"] > 0
    attack = {k: v for k, v in one["attacks"]["white-box-inversion"].items() if k != "seconds"}
    assert attack == {k: v for k, v in two["attacks"]["white-box-inversion"].items() if k != "seconds"}
    assert attack["examples"] == 4  # two rows of the first batch of each data party


def test_the_server_refuses_a_non_loopback_address_without_tls():
    from atoll.errors import ConfigError
    from atoll.split.grpc_transport import ModelPartyServer

    with pytest.raises(ConfigError, match="without TLS"):
        ModelPartyServer(lambda b: b, host="0.0.0.0")


def test_the_transcript_keeps_what_the_model_party_computed_and_reloads_from_disk(tmp_path, split_config):
    from atoll.split.model_party import ModelParty
    from atoll.split.transcript import Transcript

    setup = prepare(split_config(**{"record.every": 1, "record.limit": 1}))
    session = connect(setup, None)
    model_party = ModelParty(setup.config, tmp_path)  # the same party, writing what it keeps to disk
    session.channels[0].handler = model_party.handle
    session.parties[0].hello()
    session.parties[0].train_step()
    session.parties[0].train_step()
    forward, backward = model_party.transcript.messages
    assert forward.local["outputs"].shape == (8, 3)  # head-tail: the class logits it returned
    assert all(k.startswith("parameter_gradients.") and ".lora_" in k or "score" in k for k in backward.local)
    reloaded = Transcript.load(tmp_path)
    assert [m.kind for m in reloaded.messages] == ["forward", "backward"]
    for kept, read in zip(model_party.transcript.messages, reloaded.messages, strict=True):
        assert kept.meta == read.meta and kept.tensors.keys() == read.tensors.keys() and kept.local.keys() == read.local.keys()
        assert all(torch.equal(kept.tensors[k], read.tensors[k]) for k in kept.tensors)


def test_grpc_with_tls_verifies_the_model_party(tmp_path):
    """With a certificate the model party serves TLS; the data party verifies it against the CA.
    Plaintext to a TLS server fails, and plaintext to a non-loopback address is refused."""
    from atoll.engines.flower.certs import generate
    from atoll.errors import ConfigError
    from atoll.split.channel import SplitProtocolError
    from atoll.split.grpc_transport import GrpcChannel, ModelPartyServer

    paths = generate(tmp_path / "certs", ["localhost"])
    server = ModelPartyServer(
        lambda request: encode(Message("hello", {}, {"echo": decode(request).meta})), "localhost", 0, paths.server_cert, paths.server_key
    )
    server.start()
    try:
        secure = GrpcChannel(f"localhost:{server.port}", timeout=20, root_certificates=paths.ca)
        assert secure.call("hello", {}, {"party": 7}).meta == {"echo": {"party": 7}}
        secure.close()
        plain = GrpcChannel(f"localhost:{server.port}", timeout=5)
        with pytest.raises(SplitProtocolError, match="did not answer"):
            plain.call("hello")
        plain.close()
    finally:
        server.stop()
    with pytest.raises(ConfigError, match="in plaintext"):
        GrpcChannel("192.0.2.1:50070")


def test_head_body_tail_generation_over_grpc_gives_the_one_process_run(tmp_path, split_config, llama4_dir):
    """The other partition and the other phase on the real wire: a Llama cut 1 + 2 + 1 trains, is
    evaluated and generates (greedy, KV cache on both sides) with the model party in its own process;
    the metrics, the generated-text scores, the traffic of every phase and the adapters equal the
    one-process run's."""
    common = {
        "model.name": str(llama4_dir),
        "data.source": "synthetic-sft",
        "split.partition": "head-body-tail",
        "split.tail_blocks": 1,
        "model.max_length": 32,
        "data.max_examples": 64,
        "data.test_size": 8,
        "train.steps": 4,
        "eval.every": 4,
        "train.lr": 0.002,
        "eval.max_generate": 2,
        "eval.max_new_tokens": 4,
    }
    one_dir, one = run_split(split_config(**common, **{"run.dir": str(tmp_path / "one")}), say=lambda _: None)
    two_dir, two = run_split(split_config(**common, **{"run.dir": str(tmp_path / "two"), "split.transport": "grpc"}), say=lambda _: None)
    assert two["transport"] == "grpc" and one["transport"] != "grpc"
    read = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert _strip(read(one_dir)) == _strip(read(two_dir))
    assert one["final"] == two["final"] and one["traffic"] == two["traffic"]
    assert one["final"]["generated"] == 2 and "generation_rouge_l" in one["final"], one["final"]
    assert one["traffic"]["bytes_to_model_by_kind"].get("generate", 0) > 0, one["traffic"]  # generation crossed the wire
    for party in ("data_party_0", "model_party"):
        a = load_file(str(one_dir / party / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(two_dir / party / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
