"""``atoll split run``: build the parties from a config, train across the cut, evaluate, generate,
run the attacks on what the model party received, and write the run directory.

The run directory (the same kind as a federated run's):

    config.yaml          the resolved config
    metrics.jsonl        one line per evaluation: step, train loss, test metrics, bytes each way
    summary.json         final metrics, traffic, parameters per party, attack results, timings
    metrics.png          test metric and train loss vs step
    data_party_K/        adapter/ (PEFT) and/or full_weights.safetensors of data party K's slices
    model_party/         adapter/ (PEFT) and/or full_weights.safetensors of the model party's slice,
                         received/ (what it recorded), server.log (grpc transport)
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from atoll.data.batching import prompt_batch
from atoll.data.tasks import extract_answer
from atoll.report.rundir import RunDir
from atoll.split.attacks.base import Knowledge
from atoll.split.attacks.harness import run_attack
from atoll.split.attacks.metrics import rouge_l
from atoll.split.channel import Channel, LocalChannel
from atoll.split.config import SplitConfig
from atoll.split.data_party import DataParty, DataPartySettings
from atoll.split.defenses.base import DefenseContext, DefenseStack
from atoll.split.model_party import WIRE_DTYPES, ModelParty, lora_settings, slice_tuning
from atoll.split.plugins import parse_plugin_params, plugin_class
from atoll.split.setup import SplitSetup, prepare
from atoll.split.slices import PartyModel, SliceTuning
from atoll.split.tasks import Metrics, QuestionAnsweringData, TokenizedData
from atoll.split.transcript import Transcript

log = logging.getLogger(__name__)
MODEL_PARTY_DIR = "model_party"


def data_party_dir(party: int) -> str:
    return f"data_party_{party}"


def build_defenses(config: SplitConfig, setup: SplitSetup, party: int, model: PartyModel) -> DefenseStack:
    corpus = corpus_reader(setup, party)
    context = DefenseContext(
        party=party,
        seed=config.seed,
        partition=config.split.partition,
        head_kind=setup.head,
        hidden_size=int(model.family.word_embeddings().weight.shape[1]),
        num_labels=setup.num_labels,
        word_embeddings=model.family.word_embeddings().weight.detach().clone(),
        tokenizer=setup.tokenizer,
        token_counts=corpus_counter(setup, corpus),
        corpus=corpus,
    )
    defenses = []
    for index, item in enumerate(config.defenses):
        cls = plugin_class("defense", item.name)
        defenses.append(cls(parse_plugin_params("defense", item.name, item.params(), f"defenses[{index}]"), context))
    return DefenseStack(defenses)


def corpus_reader(setup: SplitSetup, party: int) -> Callable[[], list[np.ndarray]]:
    """The token ids of data party ``party``'s own training examples, read once on first use."""
    cached: list[list[np.ndarray]] = []

    def sequences() -> list[np.ndarray]:
        if not cached:
            data = setup.data
            cached.append(
                [
                    np.asarray(data.data.sequence(index) if isinstance(data, TokenizedData) else data.data.input_ids[index], dtype=np.int64)
                    for index in setup.party_indices[party]
                ]
            )
        return cached[0]

    return sequences


def corpus_counter(setup: SplitSetup, read: Callable[[], list[np.ndarray]]) -> Callable[[], np.ndarray]:
    """Token counts of the training examples ``read()`` gives, computed once on first use."""
    cached: list[np.ndarray] = []

    def counts() -> np.ndarray:
        if not cached:
            size = setup.vocabulary.size
            total = np.zeros(size, dtype=np.int64)
            for ids in read():
                np.add.at(total, ids % size, 1)
            cached.append(total)
        return cached[0]

    return counts


def data_party_model(setup: SplitSetup) -> PartyModel:
    config = setup.config
    return PartyModel(
        copy.deepcopy(setup.model), setup.head, setup.cut.of_party("data"), slice_tuning(config), lora_settings(config), config.seed
    )


@dataclass
class SplitSession:
    """The parties of one run and their channels (in-process, or over gRPC to another process)."""

    setup: SplitSetup
    parties: list[DataParty]
    channels: list[Channel]
    model_party: ModelParty | None  # in-process only
    process: Any = None  # the model party's process (grpc, started here)
    model_party_dir: Path | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def traffic(self) -> dict[str, Any]:
        totals: dict[str, Any] = {"bytes_to_model": 0, "bytes_to_data": 0, "bytes_to_model_by_kind": {}, "bytes_to_data_by_kind": {}}
        for channel in self.channels:
            snapshot = channel.traffic.snapshot()
            for key in ("bytes_to_model", "bytes_to_data"):
                totals[key] += snapshot[key]
            for key in ("bytes_to_model_by_kind", "bytes_to_data_by_kind"):
                for kind, count in snapshot[key].items():
                    totals[key][kind] = totals[key].get(kind, 0) + count
        return totals

    def finish(self) -> dict[str, Any]:
        reply = self.channels[0].call("finish", {}, {}).meta
        for channel in self.channels:
            channel.close()
        if self.process is not None:
            self.process.wait()
        return reply

    def transcript(self) -> Transcript:
        if self.model_party is not None:
            return self.model_party.transcript
        assert self.model_party_dir is not None
        return Transcript.load(self.model_party_dir)

    def abort(self) -> None:
        for channel in self.channels:
            channel.close()
        if self.process is not None:
            self.process.kill()


def connect(setup: SplitSetup, run_dir: Path | None, config_path: Path | None = None) -> SplitSession:
    """Create the model party (here or in a process) and the data parties, and say hello."""
    config = setup.config
    dtype = WIRE_DTYPES[config.split.wire_dtype]
    model_dir = run_dir / MODEL_PARTY_DIR if run_dir is not None else None
    process = None
    model_party = None
    if config.split.transport == "local":
        model_party = ModelParty(config, model_dir)
        channels: list[Channel] = [LocalChannel(model_party.handle, dtype) for _ in setup.party_indices]
    else:
        from atoll.split.grpc_transport import GrpcChannel

        address = config.split.address
        if address is None:
            from atoll.split.process import ModelPartyProcess

            if config_path is None or model_dir is None:
                raise ValueError("starting a model party process needs the run directory's config")
            process = ModelPartyProcess(config_path, model_dir)
            address = process.address
        roots = Path(config.split.root_certificates).expanduser() if config.split.root_certificates else None
        channels = [GrpcChannel(address, config.split.timeout, dtype, roots) for _ in setup.party_indices]
        try:
            channels[0].wait_ready(60.0)
        except Exception:
            if process is not None:
                process.kill()
            raise
    planned = setup.planned_steps()
    facts = setup.hello_facts()
    parties = []
    for party, indices in enumerate(setup.party_indices):
        model = data_party_model(setup)
        settings = DataPartySettings(
            party=party,
            seed=config.seed,
            lr=config.train.lr,
            weight_decay=config.train.weight_decay,
            max_grad_norm=config.train.max_grad_norm,
            planned_steps=planned[party],
            batch_size=config.train.batch_size,
            schedule=config.train.schedule,
            warmup_steps=config.train.warmup_steps,
            group_by_length=config.train.group_by_length,
            facts=facts,
            model_party_steps=sum(planned),
        )
        parties.append(
            DataParty(settings, model, channels[party], setup.data, indices, setup.cut, build_defenses(config, setup, party, model))
        )
    session = SplitSession(setup, parties, channels, model_party, process, model_dir)
    try:
        for party in parties:
            session.notes["model_party"] = party.hello().get("model_party", {})
    except Exception:
        session.abort()
        raise
    return session


# -- evaluation -------------------------------------------------------------------------------------


def evaluate_party(session: SplitSession, party: DataParty) -> dict[str, float]:
    setup = session.setup
    config = setup.config
    qa = setup.data.data if isinstance(setup.data, QuestionAnsweringData) else None
    metrics = Metrics(setup.head, setup.num_labels, qa, config.eval.max_answer_tokens)
    result = party.evaluate(setup.test_indices, config.eval.batch_size, metrics)
    if config.eval.max_generate and isinstance(setup.data, TokenizedData):
        result.update(generation_metrics(session, party))
    result.update({f"defense.{k}": v for k, v in party.defenses.report().items()})
    return result


def generation_metrics(session: SplitSession, party: DataParty) -> dict[str, float]:
    """Greedy generation across the cut on test prompts: exact match (math) and ROUGE-L on tokens."""
    setup = session.setup
    config = setup.config
    assert isinstance(setup.data, TokenizedData)
    data = setup.data.data
    tokenizer = setup.tokenizer
    indices = setup.test_indices[: config.eval.max_generate]
    exact = rouge = 0.0
    for start in range(0, len(indices), config.eval.batch_size):
        chunk = indices[start : start + config.eval.batch_size]
        batch = prompt_batch(data, chunk, setup.data.pad_id)
        generated = party.generate(
            batch["input_ids"], batch["attention_mask"], config.eval.max_new_tokens, tokenizer.eos_token_id, setup.data.pad_id
        )
        for row, index in enumerate(chunk):
            tokens = [t for t in generated[row].tolist() if t not in (tokenizer.eos_token_id, setup.data.pad_id)]
            reference = data.sequence(index)[int(data.prompt_len[index]) :].tolist()
            reference = [t for t in reference if t != tokenizer.eos_token_id]
            rouge += rouge_l(tokens, reference)
            if setup.task == "math":
                answer = extract_answer(tokenizer.decode(tokens, skip_special_tokens=True), strict=True)
                exact += float(answer is not None and answer == data.answers[index])
    result = {"generation_rouge_l": rouge / len(indices), "generated": float(len(indices))}
    if setup.task == "math":
        result["exact_match"] = exact / len(indices)
    return result


def mean_metrics(per_party: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for m in per_party for k in m})
    return {k: float(np.mean([m[k] for m in per_party if k in m])) for k in keys}


# -- attacks ----------------------------------------------------------------------------------------


def make_knowledge(session: SplitSession) -> Knowledge:
    setup = session.setup
    used: list[str] = []
    heads: dict[tuple[str, int], PartyModel] = {}

    def data_model(which: str, party: int) -> PartyModel:
        key = (which, party if which == "trained" else -1)
        if key not in heads:
            used.append(f"data_model:{which}")
            if which == "trained":
                heads[key] = copy.deepcopy(session.parties[party].model)
            else:
                config = setup.config
                fresh = prepare_model_copy(setup)
                frozen = {role: SliceTuning("frozen") for role in ("head", "tail")}
                heads[key] = PartyModel(fresh, setup.head, setup.cut.of_party("data"), frozen, lora_settings(config), config.seed)
        return heads[key]

    def auxiliary(count: int) -> list[dict[str, Any]]:
        used.append(f"auxiliary:{count}")
        return list(setup.data.eval_batches(setup.test_indices[:count], setup.config.eval.batch_size))

    def own_model() -> PartyModel:
        used.append("own_model")
        config = setup.config
        return PartyModel(
            prepare_model_copy(setup), setup.head, setup.cut.of_party("model"), slice_tuning(config), lora_settings(config), config.seed
        )

    special = tuple(sorted(set(getattr(setup.tokenizer, "all_special_ids", []) or [])))
    return Knowledge(data_model, auxiliary, setup.vocabulary.size, special, used, own_model)


def prepare_model_copy(setup: SplitSetup):
    """The public pretrained model, as the attacker would load it (the same seeded build)."""
    from atoll.split.models import load_task_model

    config = setup.config
    return load_task_model(config.model.name, setup.head, setup.num_labels, setup.vocabulary, config.model.dtype, config.seed)


def truth_of(session: SplitSession) -> Callable[[int, int, int], tuple[list[int], int | None]]:
    data = session.setup.data

    def truth(party: int, step: int, row: int) -> tuple[list[int], int | None]:
        index = int(session.parties[party].batch_log[step][row])
        if isinstance(data, TokenizedData):
            tokens = data.data.sequence(index).tolist()
            label = int(data.data.labels[index]) if data.kind == "classification" else None
            return tokens, label
        assert isinstance(data, QuestionAnsweringData)
        return data.data.input_ids[index].tolist(), None

    return truth


def run_attacks(session: SplitSession) -> dict[str, dict[str, float]]:
    config = session.setup.config
    if not config.attacks:
        return {}
    transcript = session.transcript()
    knowledge = make_knowledge(session)
    truth = truth_of(session)
    results = {}
    for index, item in enumerate(config.attacks):
        name = item.name if item.name not in results else f"{item.name}#{index}"
        started = time.perf_counter()
        results[name] = run_attack(item.name, item.params(), config.seed, transcript, knowledge, truth)
        results[name]["seconds"] = time.perf_counter() - started
    results["knowledge_used"] = {k: 1.0 for k in knowledge.used or []}
    return results


# -- the run ----------------------------------------------------------------------------------------


def train_and_evaluate(session: SplitSession, record: Callable[[dict[str, Any]], None], say: Callable[[str], None]) -> dict[str, Any]:
    """The loop: data parties take turns, one batch each, until each has done its steps."""
    setup = session.setup
    config = setup.config
    planned = setup.planned_steps()
    rounds = max(planned)
    started = time.perf_counter()
    pending: list[dict[str, float]] = []
    last: dict[str, Any] = {}

    def evaluate(step: int) -> None:
        nonlocal last, pending
        per_party = [evaluate_party(session, party) for party in session.parties]
        entry: dict[str, Any] = {"step": step, "eval": mean_metrics(per_party), "seconds": time.perf_counter() - started}
        if len(per_party) > 1:
            entry["parties"] = {str(k): m for k, m in enumerate(per_party)}
        if pending:
            entry["train"] = mean_metrics(pending)
        entry["traffic"] = session.traffic()
        record(entry)
        last = entry
        shown = ", ".join(f"{k} {v:.4f}" for k, v in entry["eval"].items() if k in ("accuracy", "loss", "exact_match", "f1", "perplexity"))
        train_loss = f"train loss {entry['train']['loss']:.4f}, " if "train" in entry else ""
        say(f"step {step}/{rounds}: {train_loss}{shown}")
        pending = []

    if config.eval.initial or rounds == 0:
        evaluate(0)
    for step in range(1, rounds + 1):
        for party, steps in zip(session.parties, planned):
            if party.step < steps:
                pending.append(party.train_step())
        if step % config.eval.every == 0 or step == rounds:
            evaluate(step)
    return last


def run_split(config: SplitConfig, say: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Run ``config`` end to end and write its run directory; returns (directory, summary)."""
    torch.set_num_threads(config.run.threads)
    started = time.perf_counter()
    setup = prepare(config)
    path = RunDir.choose_path(config)  # type: ignore[arg-type]
    RunDir.check_new(path)
    run = RunDir.create(path, config)  # type: ignore[arg-type]
    setup_seconds = time.perf_counter() - started
    session = connect(setup, path, path / "config.yaml")
    try:
        train_started = time.perf_counter()
        last = train_and_evaluate(session, run.append_metrics, say)
        train_seconds = time.perf_counter() - train_started
        for party in session.parties:
            party.model.save(path / data_party_dir(party.party))
        finished = session.finish()
    except BaseException:
        session.abort()
        raise
    attacks = run_attacks(session)
    summary = {
        "name": config.name,
        "model": config.model.name,
        "data": config.data.source,
        "task": setup.task,
        "partition": config.split.partition,
        "head_blocks": config.split.head_blocks,
        "tail_blocks": config.split.tail_blocks,
        "model_party_blocks": len(setup.cut.model_slice().blocks),
        "data_parties": config.split.data_parties,
        "transport": config.split.transport,
        "wire_dtype": config.split.wire_dtype,
        "steps": setup.planned_steps(),
        "final": last.get("eval", {}),
        "traffic": session.traffic(),
        "parameters": {"data_party": session.parties[0].model.parameter_counts(), "model_party": session.notes.get("model_party", {})},
        "model_party": {k: v for k, v in finished.items() if k in ("steps", "received_bytes", "recorded", "written")},
        "attacks": attacks,
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
        "run_dir": str(path),
    }
    rate = setup.majority_rate()
    if rate is not None:
        summary["majority_class_rate"] = rate
    run.write_summary(summary)
    if config.run.plots:
        from atoll.split.plots import plot_run

        plot_run(run.read_metrics(), path / "metrics.png", f"{config.name}: {config.model.name}, {config.split.partition}")
    log.info("split run written to %s", path)
    return path, summary
