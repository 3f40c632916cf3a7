"""Mixed client ranks: rank_cycle assignment, and every registered algorithm (collected at test
time, so algorithms added later are covered) either runs a 2-round federation with ranks {4, 8}
or refuses it with the ConfigError of validate_params."""

import math

import pytest
from hetrank_helpers import no_plots  # noqa: F401 (an autouse fixture)

from atoll.algorithms import available
from atoll.config import config_with
from atoll.resolve import check
from atoll.errors import ConfigError
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides


def test_rank_cycle_assigns_ranks_by_pattern_and_client_ranks_take_precedence():
    config = config_with(
        ["algorithm.name=flora", "federation.clients=7", "model.lora.rank_cycle=[4, 8, 16]", "model.lora.client_ranks={5: 2}"]
    )
    assert [config.rank_of(c) for c in range(7)] == [4, 8, 16, 4, 8, 2, 4]
    plain = config_with(["federation.clients=3", "model.lora.rank=6"])
    assert [plain.rank_of(c) for c in range(3)] == [6, 6, 6]


@pytest.mark.parametrize("value", ["[]", "[4, 0]", "[-8]"])
def test_bad_rank_cycles_are_config_errors(value):
    with pytest.raises(ConfigError, match="rank_cycle"):
        check(config_with([f"model.lora.rank_cycle={value}"]))


def test_a_one_rank_cycle_is_homogeneous_for_every_algorithm():
    config = config_with(["federation.clients=4", "model.lora.rank_cycle=[4]", "algorithm.name=fedex-lora"])
    assert {config.rank_of(c) for c in range(4)} == {4}


@pytest.mark.parametrize("name", sorted(available()))
def test_every_algorithm_runs_mixed_ranks_or_refuses_them_clearly(name, tmp_path):
    server_cls = available()[name]
    assert server_cls.capabilities.mixed_ranks in ("native", "pad", "refuse"), (
        f"{name}: mixed_ranks={server_cls.capabilities.mixed_ranks!r}"
    )
    overrides = tiny_overrides(tmp_path, **{"algorithm.name": name, "model.lora.rank_cycle": [4, 8], "train.local_steps": 2})
    if server_cls.capabilities.mixed_ranks == "refuse":
        with pytest.raises(ConfigError, match=r"cannot aggregate different LoRA ranks \[4, 8\]"):
            check(config_with(overrides))
        return
    _, summary = start_run(config_with(overrides), Progress())
    assert summary["rounds"] == 2
    metrics = [v for part in ("final_global", "final_local") for v in summary[part].values() if isinstance(v, (int, float))]
    assert metrics and all(math.isfinite(v) for v in metrics), summary
