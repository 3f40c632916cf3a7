"""The comparison's statistics, checked in closed form on constructed numbers: Student-t quantiles,
95 % intervals of a mean, paired differences against the reference, test-set standard errors,
and the held-out splits (fixed test set across seeds, a validation set no client trains on)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from atoll.fl.federation import weighted_mean
from atoll.fl.trainer import ratio_standard_error
from atoll.report.bench.stats import binomial_se, mean_interval, paired_interval, t_cdf, t_quantile


def test_t_quantiles_match_their_closed_forms():
    # df=1 is the Cauchy distribution: q(p) = tan(pi (p - 1/2)); df=2: q(p) = (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-5)  # 12.706
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-6)  # 4.303
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)  # the printed table's value
    assert t_cdf(0.0, 3) == 0.5 and t_cdf(-1.0, 3) == pytest.approx(1 - t_cdf(1.0, 3))
    with pytest.raises(ValueError):
        t_quantile(0.4, 2)


def test_mean_interval_is_t_times_the_standard_error():
    interval = mean_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, n = 3
    t = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert interval.mean == 2.0 and interval.n == 3
    assert interval.half == pytest.approx(t / math.sqrt(3), rel=1e-6)  # 2.484
    assert (interval.low, interval.high) == pytest.approx((2 - t / math.sqrt(3), 2 + t / math.sqrt(3)))
    single = mean_interval([0.7])  # one seed: a mean, no interval
    assert single.mean == 0.7 and math.isnan(single.half) and not single.excludes_zero()
    assert mean_interval([]).n == 0


def test_paired_difference_uses_the_shared_seeds_and_says_when_it_is_real():
    t = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    reference = {0: 0.50, 1: 0.55, 2: 0.60, 3: 0.9}
    noisy = paired_interval({0: 0.60, 1: 0.70, 2: 0.65}, reference)  # differences 0.10, 0.15, 0.05; seed 3 unpaired
    assert noisy.n == 3 and noisy.mean == pytest.approx(0.10)
    assert noisy.half == pytest.approx(t * 0.05 / math.sqrt(3), rel=1e-6)  # 0.124 > 0.10
    assert not noisy.excludes_zero()
    steady = paired_interval({0: 0.60, 1: 0.66, 2: 0.72}, reference)  # differences 0.10, 0.11, 0.12
    assert steady.half == pytest.approx(t * 0.01 / math.sqrt(3), rel=1e-6) and steady.excludes_zero()
    # the means of the two rows overlap within their own intervals, yet the paired difference is
    # real: the seeds' shared variation cancels (why the table pairs against the reference)
    worse = paired_interval({0: 0.45, 1: 0.50, 2: 0.55}, reference)
    assert worse.mean == pytest.approx(-0.05) and worse.half == pytest.approx(0.0, abs=1e-12) and worse.excludes_zero()


def test_test_set_standard_errors():
    assert binomial_se(0.6, 2400) == pytest.approx(0.01)  # sqrt(0.24 / 2400)
    # equal token counts: the ratio estimator's error is the ordinary standard error of the mean
    losses = np.array([1.0, 3.0, 2.0, 6.0])
    assert ratio_standard_error(losses * 5, np.full(4, 5.0)) == pytest.approx(np.std(losses, ddof=1) / 2 / 1)
    # by hand: y = (2, 2), n = (1, 3): R = 1, residuals (1, -1), sqrt(2/1 * 2) / 4 = 0.5
    assert ratio_standard_error(np.array([2.0, 2.0]), np.array([1.0, 3.0])) == pytest.approx(0.5)
    assert math.isnan(ratio_standard_error(np.array([2.0]), np.array([4.0])))


def test_mean_over_clients_combines_standard_errors_by_independence():
    rows = [(1.0, {"accuracy": 0.5, "accuracy_se": 0.1, "tokens": 10.0}), (3.0, {"accuracy": 0.7, "accuracy_se": 0.2, "tokens": 30.0})]
    independent = weighted_mean(rows)  # clients on their own, disjoint test splits
    assert independent["accuracy"] == pytest.approx(0.65)
    assert independent["accuracy_se"] == pytest.approx(math.sqrt(0.1**2 + 0.6**2) / 4)
    assert independent["tokens"] == 40.0 and independent["examples"] == 4.0
    shared = weighted_mean(rows, independent=False)  # every client's model on one shared test set
    assert shared["accuracy_se"] == pytest.approx(0.175) and shared["tokens"] == 25.0


def _splits(*overrides: str):
    from atoll.config import config_with
    from atoll.data.sources import load_source
    from atoll.data.tasks import Tokenized, resolve_task
    from atoll.experiment import make_splits

    config = config_with(["data.source=synthetic-cls", "model.name=tiny-bert", "federation.clients=4", *overrides])
    raw = load_source("synthetic-cls")
    spec = resolve_task(config.data, raw)
    n = len(raw)
    fake = Tokenized(
        np.zeros(n, np.int32), np.arange(n + 1), np.unique(raw.columns["label"], return_inverse=True)[1], np.zeros(n, np.int32)
    )
    return make_splits(config, fake, raw, spec)


def test_held_out_sets_are_disjoint_fixed_across_seeds_and_validation_is_used_only_on_request():
    held = ["data.test_size=300", "data.validation_size=200", "data.split_seed=7"]
    first, second = _splits(*held, "seed=0"), _splits(*held, "seed=1")
    assert len(first.global_test) == 300 and np.array_equal(first.global_test, second.global_test)  # one test set for every seed
    trained = np.concatenate(first.client_train + first.client_test)
    assert not set(trained) & set(first.global_test)
    assert not np.array_equal(np.concatenate(first.client_train), np.concatenate(second.client_train))  # the seed still moves the partition
    validation = _splits(*held, "seed=0", "eval.on=validation").global_test
    assert len(validation) == 200 and not set(validation) & set(first.global_test) and not set(validation) & set(trained)
    assert len(trained) + 300 + 200 == 3000
    capped = _splits(*held, "seed=0", "eval.max_examples=100").global_test  # a random part of the test set
    assert len(capped) == 100 and set(capped) < set(first.global_test) and capped.max() > first.global_test[150]
    default = _splits("data.test_size=300", "seed=3")  # without split_seed the seed draws the test set, as before
    assert not np.array_equal(default.global_test, _splits("data.test_size=300", "seed=4").global_test)


def test_validation_without_a_validation_set_is_a_config_error():
    from atoll.config import config_with
    from atoll.errors import ConfigError

    with pytest.raises(ConfigError, match="data.validation_size"):
        config_with(["eval.on=validation"])


def _row(algorithm: str, global_accuracy: list[float], local_accuracy: list[float]):
    from atoll.report.bench.results import CellResult, Row

    results = {
        seed: CellResult(
            {"final_global": {"accuracy": g}, "final_local": {"accuracy": p}, "rounds": 2, "bytes_up_total": 0, "bytes_down_total": 0},
            [],
            {},
        )
        for seed, (g, p) in enumerate(zip(global_accuracy, local_accuracy, strict=True))
    }
    return Row(algorithm, results)


def test_findings_say_only_what_the_paired_intervals_support():
    from atoll.report.bench.tables import findings, partition_table

    record = {"tasks": {"tweets": {"spec": {"metric": "accuracy", "also": [], "reference": "fedit", "target": 0.6}}}}
    rows = [
        _row("fedit", [0.50, 0.55, 0.60], [0.5, 0.5, 0.5]),
        _row("flexlora", [0.56, 0.61, 0.66], [0.6, 0.6, 0.6]),  # +0.06 on every seed: real
        _row("fedprox", [0.60, 0.50, 0.58], [0.5, 0.5, 0.5]),  # +0.10, -0.05, -0.02: +0.01 on average, noisy
        _row("centralized", [0.50, 0.56, 0.60], [0.6, 0.6, 0.6]),  # -0.057 ± 0.014 against flexlora: below it
        _row("local-only", [0.40, 0.40, 0.41], [0.55, 0.55, 0.55]),
    ]
    lines = findings(record, "tweets", "iid", rows)
    assert lines[0] == "- Global accuracy, paired against fedit over the seeds: better: flexlora (+0.060); worse: local-only (-0.147)."
    assert "best federated flexlora 0.610" in lines[1] and "it is not an upper bound at this budget" in lines[1]
    assert lines[2].startswith("- Floor: local-only's personalized accuracy is 0.550; 2 of 4 other methods do better")
    table = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in partition_table(record, "tweets", rows)}
    assert (
        table["flexlora"][1].strip() == "**+0.060 ± 0.000**"
        and table["fedprox"][1].strip() == f"+0.010 ± {4.302653 * math.sqrt(0.0063) / math.sqrt(3):.3f}"
    )


def test_perplexity_is_lower_is_better_in_findings_targets_and_its_error_comes_from_the_loss():
    from atoll.report.bench.results import CellResult, Row, metric_se
    from atoll.report.bench.tables import findings

    def run(perplexities: list[float]) -> CellResult:
        records = [
            {"round": r, "global": {"perplexity": p}, "bytes_up": 1e6 * (r > 0), "bytes_down": 1e6 * (r > 0)}
            for r, p in enumerate(perplexities)
        ]
        summary = {
            "final_global": records[-1]["global"],
            "final_local": {},
            "rounds": len(records) - 1,
            "bytes_up_total": 0,
            "bytes_down_total": 0,
        }
        return CellResult(summary, records, {})

    fedit = Row("fedit", {s: run([110, 95, 90 + s]) for s in range(3)})  # 90, 91, 92
    better = Row("flexlora", {s: run([110, 88, 85 + s]) for s in range(3)})  # 5 lower on every seed
    record = {"tasks": {"roles": {"spec": {"metric": "perplexity", "also": [], "reference": "fedit", "target": 91}}}}
    assert findings(record, "roles", "natural", [fedit, better])[0].endswith("better: flexlora (-5.0); none is worse beyond its interval.")
    # first round at or below 91: round 2 for seeds 0 and 1 (4 MB sent by then), never for seed 2
    assert fedit.target("perplexity", 91, lower_is_better=True) == (2.0, 4.0, 2)
    assert better.target("perplexity", 91, lower_is_better=True) == (1.0, 2.0, 3)
    # se(exp L) = exp(L) se(L) (the delta method) when the run recorded only the loss's error
    assert metric_se({"perplexity": 100.0, "loss_se": 0.02}, "perplexity") == pytest.approx(2.0)
