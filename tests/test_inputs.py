"""Every input checked once, at the door: config files, --set values, keys that would do nothing,
model names, run locations, realistic targets, sys.yaml files and traces. Each bad input is one
line naming the problem and the fix, found by the load or resolve step (no torch, nothing written).
Data files are in test_inputs_data.py; the real command line in test_inputs_cli.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from atoll.config import Config, config_with, load_config
from atoll.errors import AtollError, ConfigError, DataError, ModelError
from atoll.input_checks import INERT_RULES, check_run_location
from atoll.resolve import resolve

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = ROOT / "configs" / "sys" / "homogeneous-lab.yaml"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Relative paths (run.root 'runs', data files) land under pytest's temporary directory."""
    monkeypatch.chdir(tmp_path)


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def refused(overrides: list[str], kind: type[AtollError] = ConfigError) -> str:
    with pytest.raises(kind) as error:
        resolve(config_with(overrides))
    return one_line(error)


# -- config files -------------------------------------------------------------------------------------


def test_a_latin1_config_names_the_line_of_the_first_bad_byte(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("federation: {clients: 3}\nname: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "is not UTF-8: byte 0xe9 at line 2" in one_line(error) and "iconv" in str(error.value)


def test_a_utf16_config_is_named_as_such(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("name: x\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="is UTF-16 text"):
        load_config(path)


def test_a_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: bom\nfederation: {clients: 3}\n")
    config = load_config(path)
    assert config.name == "bom" and config.federation.clients == 3


@pytest.mark.parametrize(
    "text, line, first",
    [
        ("federation: {clients: 3}\nname: a\nfederation: {rounds: 2}\n", 3, 1),
        ("federation:\n  clients: 3\n  rounds: 2\n  clients: 4\n", 4, 2),
    ],
)
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, text, line, first):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = one_line(error)
    assert f"at line {line}," in message and f"is given twice (first at line {first})" in message and "keep one" in message


def test_a_directory_given_as_config_is_named(tmp_path):
    (tmp_path / "configs").mkdir()
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        load_config(tmp_path / "configs")


def test_a_yaml_syntax_error_names_line_column_and_problem(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n\tclients: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "at line 2, column 1: found character '\\t' that cannot start any token" in one_line(error)


def test_a_tab_in_the_indentation_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n  clients: 3\n\trounds: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "at line 3, column 1" in one_line(error) and "indent with spaces, not tabs" in str(error.value)


def test_yaml_reads_the_1_2_core_schema(tmp_path):
    """yes/no/on/off are words (YAML 1.1 made `name: no` False), 1e-3 is a number, 010 is ten."""
    path = tmp_path / "c.yaml"
    path.write_text("name: no\ntrain: {lr: 1e-3}\nfederation: {clients: 010}\nrun: {plots: yes}\n")
    config = load_config(path)
    assert config.name == "no" and config.train.lr == 1e-3 and config.federation.clients == 10 and config.run.plots is True
    assert load_config(None, ["name=off", "train.lr=5e-4"]).name == "off"


# -- values that validation would silently coerce ----------------------------------------------------------


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("federation.clients=true", "federation.clients: expected an integer, got the boolean true"),
        ("train.lr=false", "train.lr: expected a number, got the boolean false"),
        ("seed=true", "seed: expected an integer"),
        ("model.lora.client_ranks={1: true}", "model.lora.client_ranks.1: expected an integer"),
        ("model.lora.rank_cycle=[4, true]", "model.lora.rank_cycle[1]: expected an integer"),
        ("train.lr=.inf", "train.lr: inf is not a finite number"),
        ("train.lr=nan", "train.lr: 'nan' is not a finite number"),
        ("flower.secagg.num_shares=true", "flower.secagg.num_shares: expected a number"),
    ],
)
def test_booleans_and_non_finite_numbers_are_not_numbers(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert fragment in one_line(error)


def test_booleans_still_set_boolean_keys():
    assert load_config(None, ["run.plots=false", "model.lora.rslora=true"]).model.lora.rslora is True


def test_the_pretraining_config_gets_the_same_scalar_checks(tmp_path):
    from atoll.lm.config import load_pretrain_config

    path = tmp_path / "p.yaml"
    path.write_text("model: {layers: true}\n")
    with pytest.raises(ConfigError) as error:
        load_pretrain_config(path)
    assert "model.layers: expected an integer, got the boolean true" in one_line(error)


def test_sections_of_other_packages_inherit_the_scalar_checks():
    """A section built on atoll.config.Section (split learning's) refuses `rank: true` by itself."""
    from atoll.split.config import split_config_with

    with pytest.raises(ConfigError) as error:
        split_config_with(["model.lora.rank=true"])
    assert "model.lora.rank: expected an integer, got the boolean true" in one_line(error)


def test_algorithm_parameters_get_the_same_scalar_checks():
    assert "algorithm.mu: expected a number, got the boolean true" in refused(["algorithm.name=fedprox", "algorithm.mu=true"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("name=../../escaped", "name: must be a plain name, not empty and not a path (got '../../escaped'); set run.root or run.dir"),
        ("name=a/b", "name: must be a plain name"),
        ("name=..", "name: must be a plain name"),
        ("name=' '", "name: must be a plain name"),
        ("data.test_size=1.5", "data.test_size: a number of examples must be whole (got 1.5)"),
        ("model.lora.target_modules=[]", "model.lora.target_modules: names no module"),
        ("model.lora.target_modules=query", "model.lora.target_modules: Input should be a valid list or 'auto' (got 'query')"),
        ("model.lora.target_modules=query,value", "(got 'query,value'); write a list in brackets, e.g. [query, value]"),
        ("model.lora.client_ranks=[1, 2]", "(got [1, 2]); write a mapping in braces, e.g. {0: 4, 1: 8}"),
        ("model=", "model is empty; write its keys under it"),
        ("algorithm=fedprox", "algorithm is 'fedprox', not a section; write its keys under it, e.g. algorithm: {name: fedprox}"),
    ],
)
def test_bad_values_say_what_to_write(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert fragment in one_line(error)


@pytest.mark.parametrize(
    "override, guess",
    [("federation.client=3", "federation.clients"), ("clients=3", "federation.clients' or 'attack.clients"), ("model.lr=1", "train.lr")],
)
def test_an_unknown_key_suggests_the_one_meant(override, guess):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert f"did you mean '{guess}'?" in one_line(error)


def test_an_algorithm_name_in_the_wrong_case_is_named():
    assert "unknown algorithm 'FedIT'; did you mean 'fedit'?" in refused(["algorithm.name=FedIT"])


# -- keys that would do nothing ----------------------------------------------------------------------------

REALISTIC = ["mode=realistic", f"system={SYSTEM}"]
INERT_CASES = {
    "realistic": (["realistic.paradigm=fedasync"], "realistic.paradigm=fedasync has no effect without mode: realistic"),
    "realistic.sync": (
        [*REALISTIC, "realistic.paradigm=fedasync", "realistic.sync.wait=k_of_n"],
        "realistic.sync.wait=k_of_n has no effect without realistic.paradigm: sync",
    ),
    "realistic.fedasync": (
        [*REALISTIC, "realistic.fedasync.alpha=0.9"],
        "realistic.fedasync.alpha=0.9 has no effect without realistic.paradigm: fedasync",
    ),
    "realistic.fedbuff": (
        [*REALISTIC, "realistic.fedbuff.buffer=2"],
        "realistic.fedbuff.buffer=2 has no effect without realistic.paradigm: fedbuff",
    ),
    "realistic.staleness": (
        [*REALISTIC, "realistic.staleness.kind=hinge"],
        "realistic.staleness.kind=hinge has no effect without realistic.paradigm: fedasync",
    ),
    "realistic.concurrency": (
        [*REALISTIC, "realistic.concurrency=2"],
        "realistic.concurrency=2 has no effect without realistic.paradigm: fedasync",
    ),
    "flower": (["flower.mode=deployment"], "flower.mode=deployment has no effect without engine: flower"),
    "flower.secagg": (
        ["engine=flower", "flower.secagg.num_shares=5"],
        "flower.secagg.num_shares=5 has no effect without flower.secagg.enabled",
    ),
    "flower.dp": (["engine=flower", "flower.dp.clipping_norm=2"], "flower.dp.clipping_norm=2 has no effect without a flower.dp.mode"),
    "flower.superlink": (["engine=flower", "flower.superlink=127.0.0.1:9093"], "has no effect without flower.mode: deployment"),
    "flower.root_certificates": (["engine=flower", "flower.root_certificates=ca.crt"], "has no effect without flower.mode: deployment"),
    "flower.insecure": (["engine=flower", "flower.insecure=true"], "flower.insecure=true has no effect without flower.mode: deployment"),
    "flower.actors": (
        ["engine=flower", "flower.mode=deployment", "flower.superlink=127.0.0.1:9093", "flower.insecure=true", "flower.actors=2"],
        "flower.actors=2 has no effect without flower.mode: simulation",
    ),
    "partition.alpha": (
        ["partition.name=iid", "partition.alpha=0.1"],
        "partition.alpha=0.1 has no effect without partition.name: dirichlet",
    ),
    "partition.shards_per_client": (["partition.shards_per_client=3"], "has no effect without partition.name: shards"),
    "partition.column": (["partition.column=user"], "partition.column=user has no effect without partition.name: natural"),
    "train.local_epochs": (
        ["train.local_steps=2", "train.local_epochs=3"],
        "train.local_epochs=3 has no effect while train.local_steps is set (it takes precedence) (set train.local_steps: null",
    ),
    "run.keep_checkpoints": (
        [f"system={SYSTEM}", "mode=realistic", "realistic.dry_run=true", "run.keep_checkpoints=2"],
        "run.keep_checkpoints=2 has no effect in realistic mode",
    ),
    "privacy.dp": (["privacy.dp.noise_multiplier=1.5"], "privacy.dp.noise_multiplier=1.5 has no effect without a privacy.dp.mode other"),
    "privacy.dp.target_quantile": (
        ["privacy.dp.mode=fixed", "privacy.dp.noise_multiplier=1", "privacy.dp.target_quantile=0.7"],
        "privacy.dp.target_quantile=0.7 has no effect without privacy.dp.mode: adaptive",
    ),
    "privacy.dp.clip_lr": (
        ["privacy.dp.mode=fixed", "privacy.dp.noise_multiplier=1", "privacy.dp.clip_lr=0.5"],
        "privacy.dp.clip_lr=0.5 has no effect without privacy.dp.mode: adaptive",
    ),
    "privacy.dp.count_noise_stddev": (
        ["privacy.dp.mode=fixed", "privacy.dp.noise_multiplier=1", "privacy.dp.count_noise_stddev=0.5"],
        "privacy.dp.count_noise_stddev=0.5 has no effect without privacy.dp.mode: adaptive",
    ),
    "privacy.dpsgd": (["privacy.dpsgd.noise_multiplier=2"], "privacy.dpsgd.noise_multiplier=2 has no effect without privacy.dpsgd.enabled"),
    "privacy.secagg": (["privacy.secagg.threshold=3"], "privacy.secagg.threshold=3 has no effect without privacy.secagg.enabled"),
    "robust.byzantine": (["robust.byzantine=2"], "robust.byzantine=2 has no effect without robust.rule: krum or multi-krum"),
    "robust.keep": (["robust.rule=krum", "robust.keep=3"], "robust.keep=3 has no effect without robust.rule: multi-krum"),
    "robust.trim_fraction": (["robust.trim_fraction=0.2"], "robust.trim_fraction=0.2 has no effect without robust.rule: trimmed-mean"),
    "robust.norm_bound": (["robust.norm_bound=2"], "robust.norm_bound=2 has no effect without robust.rule: norm-bounding"),
    "robust.root_examples": (["robust.root_examples=50"], "robust.root_examples=50 has no effect without robust.rule: fltrust"),
    "robust.noise_factor": (["robust.noise_factor=0.01"], "robust.noise_factor=0.01 has no effect without robust.rule: flame"),
    "robust.validation": (
        ["robust.validation.max_norm=3"],
        "robust.validation.max_norm=3 has no effect without robust.validation.enabled",
    ),
}


@pytest.mark.parametrize("rule", [rule.key for rule in INERT_RULES])
def test_a_key_that_would_do_nothing_is_refused(rule):
    overrides, fragment = INERT_CASES[rule]  # a new rule needs its case here
    assert fragment in refused(overrides)


def test_a_key_that_would_do_nothing_says_how_to_unset_it():
    message = refused(["partition.name=iid", "partition.column=owner"])
    assert message.endswith("(set partition.name: natural, or remove partition.column; on the command line --set partition.column=null)")


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "mode=realistic",
            f"system={SYSTEM}",
            "realistic.paradigm=fedasync",
            "realistic.fedasync.alpha=0.9",
            "realistic.staleness.kind=hinge",
        ],
        ["mode=realistic", f"system={SYSTEM}", "realistic.paradigm=fedbuff", "realistic.fedbuff.buffer=2", "realistic.concurrency=3"],
        ["engine=flower", "flower.secagg.enabled=true", "flower.secagg.num_shares=5", "flower.secagg.reconstruction_threshold=3"],
        ["partition.name=natural", "partition.column=user", "data.source=synthetic-cls", "model.name=tiny-bert"],
        ["partition.name=quantity", "partition.alpha=0.2"],
        ["train.local_epochs=2"],
    ],
)
def test_the_same_keys_with_their_switch_on_are_accepted(overrides):
    resolve(config_with(overrides))


def test_a_config_with_every_key_written_out_resolves():
    """What `atoll config PATH` prints and a run directory's config.yaml holds (every key, defaults
    included) must not trip the checks of keys that do nothing."""
    for config in (load_config(), config_with(["partition.name=iid"]), config_with(["engine=flower"])):
        tree = Config.model_validate(json.loads(config.model_dump_json()))
        resolve(load_config_text(config.to_yaml()))
        assert tree == config


def load_config_text(text: str) -> Config:
    path = Path("written-out.yaml")
    path.write_text(text)
    return load_config(path)


def test_every_shipped_config_resolves():
    configs = sorted((ROOT / "configs").glob("*.yaml")) + [
        ROOT / "configs" / "bench" / f"{task}.yaml" for task in ("tweets", "shakespeare")
    ]
    assert configs
    for path in configs:
        resolve(load_config(path))


# -- model, run location, realistic target ---------------------------------------------------------------


@pytest.mark.parametrize(
    "model, length, limit",
    [("tiny-bert", 513, 512), ("minilm", 1000, 512), ("atoll-edge", 600, 512), ("tiny-llama", 2048, 1024)],
)
def test_max_length_beyond_the_model_positions_is_refused(model, length, limit):
    message = refused(
        [
            f"model.name={model}",
            f"model.max_length={length}",
            "data.source=synthetic-sft" if "llama" in model or "atoll" in model else "data.source=synthetic-cls",
            "partition.name=iid",
        ]
    )
    assert f"model.max_length={length} exceeds the {limit} positions of model '{model}'" in message
    assert f"set model.max_length <= {limit}" in message


def test_max_length_of_a_local_model_comes_from_its_config(tmp_path):
    model = tmp_path / "roberta"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}))
    (model / "model.safetensors").write_bytes(b"")  # only its presence is checked at the door
    resolve(config_with([f"model.name={model}", "model.max_length=512"]))
    assert "exceeds the 512 positions" in refused([f"model.name={model}", "model.max_length=513"])


@pytest.mark.parametrize(
    "files, fragment",
    [
        ({"weights.bin": "x"}, "model.name './weights.bin' is a file, not a model directory"),
        ({"m/notes.txt": "x"}, "'./m' is not a Hugging Face model directory: it has no config.json"),
        ({"m/config.json": "{not json"}, "the config.json of model './m' cannot be read"),
    ],
)
def test_a_model_path_that_is_not_a_model_is_refused(tmp_path, files, fragment):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    target = "./weights.bin" if "weights.bin" in files else "./m"
    assert fragment in refused([f"model.name={target}"], ModelError)


def test_a_model_directory_without_weights_is_refused_unless_random_init(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 512}))
    message = refused(["model.name=./m"], ModelError)
    assert "model directory './m' holds no weights (model.safetensors or pytorch_model.bin)" in message
    assert "model.random_init: true" in message
    resolve(config_with(["model.name=./m", "model.random_init=true"]))


def test_generation_beyond_the_model_positions_is_refused():
    base = ["model.name=tiny-llama", "data.source=gsm8k", "model.max_length=1000", "partition.name=iid"]
    assert "model.max_length=1000 plus eval.max_new_tokens=96 exceeds the 1024 positions of model 'tiny-llama'" in refused(base)
    resolve(config_with([*base, "eval.max_new_tokens=24"]))
    resolve(
        config_with(["model.name=tiny-llama", "data.source=synthetic-sft", "model.max_length=1024", "partition.name=iid"])
    )  # sft generates nothing


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["federation.clients=2000000"], "federation.clients: Input should be less than or equal to 1000000"),
        (["data.max_examples=300", "data.test_size=300"], "data.test_size=300 leaves nothing of data.max_examples=300 for training"),
        (
            ["data.max_examples=300", "data.test_size=0.5", "data.validation_size=150"],
            "data.test_size=0.5 and data.validation_size=150 leave nothing of data.max_examples=300 for training",
        ),
        (["run.threads=3"], "run.threads=3 is more than the 2 CPU cores of this machine (set run.threads <= 2)"),
    ],
)
def test_counts_that_cannot_fit_are_refused(monkeypatch, overrides, fragment):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert fragment in refused(overrides)


def test_a_test_set_as_large_as_a_local_file_is_refused(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\n" + "a goal,sports\nrain,weather\n" * 10)
    message = refused(["data.source=d.csv", "data.test_size=20"], DataError)
    assert "data.test_size=20 leaves nothing of the 20 examples of d.csv for training" in message


def test_a_natural_partition_names_an_existing_column(tmp_path):
    assert "partition.name: natural needs partition.column" in refused(["partition.name=natural"])
    sft = ["data.source=synthetic-sft", "model.name=tiny-llama"]
    assert "partition.name: dirichlet splits by class label and the sft task has none" in refused(sft)  # dirichlet: the default
    resolve(config_with([*sft, "partition.name=iid"]))
    (tmp_path / "d.csv").write_text("text,label,owner\n" + "a goal,sports,ann\nrain,weather,bob\n" * 10)
    natural = ["data.source=d.csv", "data.test_size=4", "partition.name=natural", "federation.clients=2"]
    message = refused([*natural, "partition.column=user"], DataError)
    assert "partition.column 'user' does not exist in d.csv (columns are: 'text', 'label', 'owner')" in message
    resolve(config_with([*natural, "partition.column=owner"]))


def test_a_misspelt_built_in_model_or_source_suggests_the_one_meant():
    assert "unknown model 'tiny-lama'; did you mean 'tiny-llama'?" in refused(["model.name=tiny-lama"], ModelError)
    assert "unknown data source 'synthetic-clss'; did you mean 'synthetic-cls'?" in refused(["data.source=synthetic-clss"], DataError)


def test_an_encoder_for_a_generative_task_is_refused_before_loading():
    assert "model 'minilm' is an encoder and cannot generate text (data.task sft)" in refused(["data.source=synthetic-sft"], ModelError)


def location_refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as error:
        check_run_location(config_with(overrides))
    return one_line(error)


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ("run.root=/proc/atoll-runs", "cannot create the run directory under run.root '/proc/atoll-runs/"),
        ("run.root=afile", "would be inside"),
        ("run.root=afile/runs", "which is a file"),
        ("run.dir=afile", "run directory '{tmp}/afile' is a file"),
        ("name=" + "a" * 300, "bytes; this filesystem allows"),
    ],
)
def test_a_run_directory_that_cannot_be_made_is_refused_before_anything_loads(tmp_path, setting, fragment):
    (tmp_path / "afile").write_text("x")
    message = location_refused([setting])
    assert fragment.format(tmp=tmp_path) in message and ("set run.root" in message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"], "nothing written"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; /proc covers root")
def test_a_read_only_run_root_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert "is not writable" in location_refused([f"run.root={locked}/runs"])
    finally:
        locked.chmod(0o755)


def test_a_writable_run_root_is_checked_without_writing(tmp_path):
    check_run_location(config_with([f"run.root={tmp_path}/deep/runs"]))
    assert not (tmp_path / "deep").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["realistic.target_metric=acuracy", "realistic.target_value=0.9"],
            "realistic.target_metric 'acuracy' is not a metric of the classification task; did you mean 'accuracy'? (use one of: accuracy, macro_f1, loss)",
        ),
        (
            ["realistic.target_metric=accuracy", "realistic.target_value=80"],
            "realistic.target_value=80.0 can never be reached: accuracy is a fraction in [0, 1] (write it as a fraction, e.g. 0.8)",
        ),
        (["realistic.target_metric=perplexity", "realistic.target_value=20"], "'perplexity' is not a metric of the classification task"),
        (
            ["realistic.target_metric=accuracy", "realistic.target_value=0.9", "realistic.dry_run=true"],
            "a dry run trains and evaluates nothing",
        ),
    ],
)
def test_an_unreachable_realistic_target_is_refused(overrides, fragment):
    assert fragment in refused(["mode=realistic", f"system={SYSTEM}", *overrides])


def test_a_reachable_realistic_target_is_accepted():
    resolve(config_with(["mode=realistic", f"system={SYSTEM}", "realistic.target_metric=accuracy", "realistic.target_value=0.6"]))
    resolve(
        config_with(
            [
                "mode=realistic",
                f"system={SYSTEM}",
                "data.source=synthetic-sft",
                "model.name=tiny-llama",
                "partition.name=iid",
                "realistic.target_metric=perplexity",
                "realistic.target_value=20",
            ]
        )
    )


def test_the_metric_table_matches_what_evaluation_reports(reference_runs):
    """TASK_METRICS (what realistic.target_metric may name) against a real run's global metrics."""
    from atoll.config import TASK_METRICS

    records = [json.loads(line) for line in (reference_runs.get() / "metrics.jsonl").read_text().splitlines()]
    reported = {name for name in records[-1]["global"] if name != "examples" and not name.endswith("_se")}  # _se: standard errors
    assert reported == set(TASK_METRICS["classification"])


# -- sys.yaml and traces ---------------------------------------------------------------------------------


def write_system(tmp_path, text: str | bytes, trace: bytes | None = None) -> Path:
    path = tmp_path / "sys.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    if trace is not None:
        (tmp_path / "trace.csv").write_bytes(trace)
    return path


DEVICES = "devices: {mix: {laptop: 1.0}}\nnetworks: {mix: {wifi: 1.0}}\n"
TRACED = DEVICES + "availability: {windows: trace, trace: {path: trace.csv, map: modulo}}\n"


@pytest.mark.parametrize(
    "text, fragment",
    [
        (DEVICES + "devices: {mix: {budget-phone: 1.0}}\n", "at line 3, column 1: key 'devices' is given twice (first at line 1)"),
        (("description: caf\xe9\n" + DEVICES).encode("latin-1"), "is not UTF-8: byte 0xe9 at line 1"),
        (
            "devices: {mix: {laptop: 1.0}, speed_sigma: true}\nnetworks: {mix: {wifi: 1.0}}\n",
            "devices.speed_sigma: expected a number, got the boolean true",
        ),
    ],
)
def test_a_bad_sys_yaml_is_one_line(tmp_path, text, fragment):
    path = write_system(tmp_path, text)
    assert fragment in refused(["mode=realistic", f"system={path}", "realistic.dry_run=true"])


def test_a_trace_with_a_byte_order_mark_is_read(tmp_path):
    path = write_system(tmp_path, TRACED, b"\xef\xbb\xbfclient,start,end\n0,0,3600\n")
    resolve(config_with(["mode=realistic", f"system={path}", "realistic.dry_run=true"]))


def test_a_latin1_trace_is_one_line(tmp_path):
    path = write_system(tmp_path, TRACED, "client,start,end\n# caf\xe9\n0,0,3600\n".encode("latin-1"))
    message = refused(["mode=realistic", f"system={path}", "realistic.dry_run=true"], DataError)
    assert "trace.csv' is not UTF-8: byte 0xe9 at line 2" in message
