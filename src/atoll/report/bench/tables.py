"""docs/algorithms.md: the comparison tables with intervals and paired differences, the budget of
each task, the learning-rate sweep, and how the bench was made (command, versions, time, load)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from atoll.report.bench.results import Row
from atoll.report.bench.stats import Interval, mean_interval

LABELS = {
    "accuracy": "accuracy",
    "perplexity": "perplexity",
    "token_accuracy": "next-token acc.",
    "loss": "loss",
    "macro_f1": "macro-F1",
}


def digits(metric: str) -> int:
    return 1 if metric == "perplexity" else 3


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def figure(interval: Interval, se: float | None, metric: str) -> str:
    """'0.612 ± 0.008 (0.011)': the mean over seeds, its 95 % half-width, the test-set error."""
    if interval.n == 0 or math.isnan(interval.mean):
        return "—"
    places = digits(metric)
    text = f"{interval.mean:.{places}f}"
    if interval.n > 1:
        text += f" ± {interval.half:.{places}f}"
    if se is not None:
        text += f" ({se:.{places}f})"
    return text


def difference(interval: Interval, metric: str) -> str:
    """'+0.021 ± 0.015', bold when the 95 % interval excludes zero."""
    if interval.n == 0 or math.isnan(interval.mean):
        return "—"
    places = digits(metric)
    text = f"{interval.mean:+.{places}f}" + (f" ± {interval.half:.{places}f}" if interval.n > 1 else "")
    return f"**{text}**" if interval.excludes_zero() else text


def _number(value: float | None, places: int) -> str:
    return "—" if value is None else f"{value:.{places}f}"


def partition_table(record: dict, task: str, rows: list[Row]) -> list[str]:
    """The table of one task and partition."""
    spec = record["tasks"][task]["spec"]
    metric, also, target, lower = spec["metric"], spec["also"], spec["target"], spec["metric"] in ("loss", "perplexity")
    reference = next((r for r in rows if r.algorithm == spec["reference"] and r.results), None)
    name, ref_name = label(metric), spec["reference"]
    header = [f"global {name}", f"Δ global vs {ref_name}"]
    header += [f"global {label(m)}" for m in also]
    header += [f"personalized {name}", f"Δ personalized vs {ref_name}"]
    header += [f"personalized {label(m)}" for m in also]
    header += [f"rounds to {target:g}", f"MB to {target:g}", "MB up / down per round", "s / round"]
    lines = ["| algorithm | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    lines += _reference_rows(rows, metric, also, len(header))
    for row in rows:
        if not row.results:
            failure = next(iter(row.failures.values()), "not run")
            lines.append(f"| {row.algorithm} | failed: {failure} |" + " |" * (len(header) - 1))
            continue
        cells = [figure(row.interval("global", metric), row.se("global", metric), metric)]
        cells.append(difference(row.difference(reference, "global", metric), metric) if reference and row is not reference else "")
        cells += [figure(row.interval("global", m), row.se("global", m), m) for m in also]
        cells.append(figure(row.interval("local", metric), row.se("local", metric), metric))
        cells.append(difference(row.difference(reference, "local", metric), metric) if reference and row is not reference else "")
        cells += [figure(row.interval("local", m), row.se("local", m), m) for m in also]
        rounds, megabytes, reached = row.target(metric, target, lower)
        seeds = len(row.results)
        cells.append(f"{rounds:.1f} ({reached}/{seeds})" if rounds is not None else f"— (0/{seeds})")
        cells.append(f"{megabytes:.1f}" if megabytes is not None else "—")
        up, down = row.mean_of(lambda r: r.megabytes_per_round("up")), row.mean_of(lambda r: r.megabytes_per_round("down"))
        cells.append(f"{up:.2f} / {down:.2f}")
        cells.append(_number(row.mean_of(lambda r: r.seconds_per_round()), 1))
        failed = f" ({len(row.failures)} failed)" if row.failures else ""
        lines.append(f"| {row.algorithm}{failed} | " + " | ".join(cells) + " |")
    return lines


def _reference_rows(rows: list[Row], metric: str, also: list[str], width: int) -> list[str]:
    """The constant predictor (classification) or the model before fine-tuning (round 0)."""
    results = [r for row in rows for r in row.results.values()]
    if not results:
        return []
    lines = []
    if metric == "accuracy" and any("majority_class_rate" in r.summary for r in results):
        by_seed: dict[int, Any] = {}
        for row in rows:
            for seed, result in row.results.items():
                by_seed.setdefault(seed, result.summary)
        global_rate = mean_interval([s["majority_class_rate"] for s in by_seed.values() if "majority_class_rate" in s])
        local_rate = mean_interval([s["local_majority_rate"] for s in by_seed.values() if s.get("local_majority_rate") is not None])
        cells = [figure(global_rate, None, metric), ""] + [""] * len(also) + [figure(local_rate, None, metric), ""]
        lines.append("| *majority class (constant predictor)* | " + " | ".join(cells + [""] * (width - len(cells))) + " |")
    initial = [r.summary["initial_global"] for r in results if r.summary.get("initial_global")]
    if initial and metric != "accuracy":
        first = initial[0]  # every run of a task starts from the same pretrained model and test set
        from atoll.report.bench.results import metric_se

        cells = [figure(mean_interval([first[metric]]), metric_se(first, metric), metric), ""]
        cells += [figure(mean_interval([first[m]]), metric_se(first, m), m) for m in also if m in first]
        lines.append("| *before fine-tuning* | " + " | ".join(cells + [""] * (width - len(cells))) + " |")
    return lines


def budget(runs_config: dict, summary: dict, learning_rates: dict[str, float]) -> str:
    """One paragraph: the budget and data of a task, from one of its runs' resolved config."""
    data, federation, train, model, evaluation = (runs_config[k] for k in ("data", "federation", "train", "model", "eval"))
    clients = federation["clients"]
    sampled = max(1, math.ceil(federation["sample_rate"] * clients - 1e-9))
    steps = train["local_steps"]
    decay = train["round_decay"]
    final_factor = decay ** (federation["rounds"] - 1)
    rates = ", ".join(f"{a} {lr:g}" for a, lr in sorted(learning_rates.items(), key=lambda x: (x[1], x[0])))
    examples = f"{data['max_examples']:,} examples" if data.get("max_examples") else "all examples"
    return (
        f"{model['name']} with LoRA r={model['lora']['rank']}, max length {model['max_length']}; {examples} of `{data['source']}`; "
        f"{clients} clients, {federation['rounds']} rounds, {sampled} clients per round, {steps} local steps of batch {train['batch_size']} "
        f"(centralized: the pooled data, {sampled * steps} steps per round); AdamW, peak learning rate per family (below), "
        f"{train['schedule']} within a round, multiplied by {decay:g} every round (the last round trains at {final_factor:.2f} of the peak); "
        f"global test set {summary['global_test_examples']:,} examples (the same for every seed: `data.split_seed` {data['split_seed']}), "
        f"validation set {_held_out(data['validation_size'])} (the sweep's; no reported number uses it), "
        f"local test splits {data['local_test_fraction']:.0%} of each client's data; evaluated every {evaluation['every']} rounds.\n\n"
        f"Learning rates: {rates}."
    )


def _partition_budget(overrides: list[str], rows: list[Row], task_config: dict | None) -> list[str]:
    """The settings that make this partition, and its rounds when they differ from the task's budget paragraph."""
    if not overrides:
        return []
    text = f"This partition's runs set {', '.join(f'`{x}`' for x in overrides)}."
    run = next((r for row in rows for r in row.results.values()), None)
    if run is not None and task_config is not None:
        config = yaml.safe_load((Path(run.summary["run_dir"]) / "config.yaml").read_text())
        rounds, decay = config["federation"]["rounds"], config["train"]["round_decay"]
        if rounds != task_config["federation"]["rounds"]:
            text += f" It runs {rounds} rounds: the last trains at {decay ** (rounds - 1):.2f} of the peak learning rate."
    return [text, ""]


def _held_out(size: float) -> str:
    return f"{int(size):,} examples" if size >= 1 else f"{size:.0%} of the data"


def sweep_table(sweep: dict, task: str, families: list[str]) -> list[str]:
    """The learning-rate sweep of one task: validation metric per family, rate and partition."""
    scores = (sweep.get("scores") or {}).get(task) or {}
    chosen = (sweep.get("chosen") or {}).get(task) or {}
    if not scores:
        return []
    rates = sorted({lr for f in families for lr in scores.get(f, {})}, key=float)
    partitions = sorted({p for f in families for r in scores.get(f, {}).values() for p in r})
    lines = [
        "| family | partition | " + " | ".join(f"lr {lr}" for lr in rates) + " |",
        "|---|---|" + "---|" * len(rates),
    ]
    for family in families:
        for partition in partitions:
            cells = []
            for lr in rates:
                value = scores.get(family, {}).get(lr, {}).get(partition)
                text = "—" if value is None else f"{value:.3f}"
                cells.append(f"**{text}**" if chosen.get(family) is not None and float(lr) == float(chosen[family]) else text)
            lines.append(f"| {family} | {partition} | " + " | ".join(cells) + " |")
    edge = [f for f in families if chosen.get(f) is not None and rates and float(chosen[f]) in (float(rates[0]), float(rates[-1]))]
    if edge:
        lines += ["", f"Chosen at an edge of the grid (a wider grid may do better): {', '.join(edge)}."]
    cost = scores.get("_cost")
    if cost:
        lines += ["", f"The sweep of this task: {cost['runs']} runs, {cost['cpu_minutes']} CPU minutes."]
    return lines


def findings(record: dict, task: str, partition: str, rows: list[Row]) -> list[str]:
    """What the intervals support, computed (not written by hand): which methods differ from the
    reference, whether centralized bounds the federated methods, whether local-only is the floor."""
    spec = record["tasks"][task]["spec"]
    metric, reference = spec["metric"], spec["reference"]
    lower = metric in ("loss", "perplexity")
    by_name = {r.algorithm: r for r in rows if r.results}
    if reference not in by_name:
        return []
    ref = by_name[reference]
    better, worse = [], []
    for row in by_name.values():
        if row is ref:
            continue
        delta = row.difference(ref, "global", metric)
        if delta.excludes_zero():
            good = delta.mean < 0 if lower else delta.mean > 0
            (better if good else worse).append(f"{row.algorithm} ({delta.mean:+.{digits(metric)}f})")
    lines = [
        f"- Global {label(metric)}, paired against {reference} over the seeds: "
        + (f"better: {', '.join(better)}; " if better else "no method is better beyond its interval; ")
        + (f"worse: {', '.join(worse)}." if worse else "none is worse beyond its interval.")
    ]
    federated = [r for r in by_name.values() if r.algorithm not in ("centralized", "local-only")]
    if "centralized" in by_name and federated:
        pick = min if lower else max
        best = pick(federated, key=lambda r: r.interval("global", metric).mean)
        central, top = by_name["centralized"].interval("global", metric), best.interval("global", metric)
        delta = by_name["centralized"].difference(best, "global", metric)
        worse_central = (delta.mean > 0) if lower else (delta.mean < 0)
        if not worse_central or not delta.excludes_zero():
            verdict = "centralized reaches the best federated method within its interval"
        else:
            verdict = "centralized stays below the best federated method beyond its interval: it is not an upper bound at this budget"
        lines.append(
            f"- Upper bound: centralized {central.mean:.{digits(metric)}f}, best federated {best.algorithm} {top.mean:.{digits(metric)}f} "
            f"(paired difference {delta.mean:+.{digits(metric)}f} ± {delta.half:.{digits(metric)}f}): {verdict}."
        )
    if "local-only" in by_name:
        floor = by_name["local-only"].interval("local", metric)
        above = [
            r.algorithm
            for r in by_name.values()
            if r.algorithm != "local-only"
            and r.interval("local", metric).n
            and (r.interval("local", metric).mean < floor.mean if lower else r.interval("local", metric).mean > floor.mean)
        ]
        lines.append(
            f"- Floor: local-only's personalized {label(metric)} is {floor.mean:.{digits(metric)}f}; "
            f"{len(above)} of {len(by_name) - 1} other methods do better on the clients' own test splits (means)."
        )
    return lines


def _machine_paragraph(record: dict) -> str:
    sittings = record.get("sittings", [])
    minutes = sum(s.get("minutes", 0.0) for s in sittings)
    loads = [s["load"] for s in sittings if "load" in s]
    versions = record.get("machine", {}).get("versions", {})
    version_text = ", ".join(f"{k} {v}" for k, v in versions.items())
    load_text = (
        f"1-minute load average {min(x['min'] for x in loads):.1f}–{max(x['max'] for x in loads):.1f} "
        f"(mean {statistics.fmean(x['mean'] for x in loads):.1f})"
        if loads
        else "load not recorded"
    )
    return (
        f"Made by `{record.get('command', 'atoll bench algorithms')}` with {_count(record.get('workers', 0), 'worker process', 'worker processes')} (one torch thread each) "
        f"on a {record.get('machine', {}).get('cpus', '?')}-core machine: {minutes:.1f} minutes of wall time in {len(sittings)} "
        f"sitting{'s' if len(sittings) != 1 else ''}, {load_text}. Versions: {version_text}."
    )


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def _cpu_paragraph(rows: dict[tuple[str, str], list[Row]], workers: int) -> str:
    cpu = [r.times.get("cpu_seconds") for group in rows.values() for row in group for r in row.results.values()]
    cpu = [c for c in cpu if c is not None]
    if not cpu:
        return ""
    total = sum(cpu) / 60
    return (
        f"CPU time summed over the {len(cpu)} runs: {total:.1f} minutes (each run's own process time, start-up of its run included); "
        f"on a quiet machine with {_count(workers, 'worker', 'workers')} the bench takes about {total / max(1, workers):.0f} minutes plus worker start-up. "
        f"When other jobs share the machine, wall time grows with the load and the CPU time is the figure to compare."
    )


def document(record: dict, rows: dict[tuple[str, str], list[Row]], plots: dict[str, str]) -> str:
    """The whole of docs/algorithms.md."""
    tasks = record["tasks"]
    seeds = record["seeds"]
    lines = [
        "# Algorithm comparison",
        "",
        f"Federated LoRA algorithms on {len(tasks)} task{'s' if len(tasks) > 1 else ''} "
        f"({'; '.join(spec['spec']['title'] for spec in tasks.values())}), "
        f"{len(seeds)} seeds each ({', '.join(map(str, seeds))}), with a learning rate per algorithm family chosen on a held-out "
        "validation split. Regenerate it with the command below; `--render-only` rewrites this page from the finished runs.",
        "",
        _machine_paragraph(record),
        "",
        _cpu_paragraph(rows, record.get("workers", 1)),
        *(f"\n{note}" for note in record.get("notes", [])),
        "",
        "## How to read the tables",
        "",
        f"- **A figure** is the mean over the {len(seeds)} seeds ± the half-width of its 95 % Student-t interval "
        f"(t(0.975, {len(seeds) - 1}) × s / √{len(seeds)}), then in brackets the test set's standard error of one run's figure "
        "(accuracy: binomial, √(p(1−p)/n); perplexity and next-token accuracy: over lines, each line one cluster of tokens). "
        "The interval says how much the figure moves with the seed (data subset, partition, initial adapter, batches); "
        "the standard error says how finely the test set measures one run.",
        "- **Δ vs the reference** is the mean over seeds of (method − reference) on the same seed, which shares the "
        "data, partition and initial adapter, ± its 95 % interval: **bold** when the interval excludes zero, that is "
        "when the difference is real at this budget.",
        "- **Global**: the server's model on the global test set (for algorithms without a global model: the mean of the "
        "clients' own models on it). **Personalized**: each client's model on its own test split, weighted by split size.",
        "- **Rounds / MB to target**: the first evaluated round whose global figure reaches the target, and the megabytes "
        "sent up and down until then (mean over the seeds that reach it; in brackets how many do). **MB per round**: bytes "
        "sent, summed over clients. **s / round**: wall seconds of a round's local training and aggregation on this "
        "machine, evaluation excluded (it grows with the machine's load; see above).",
        "",
    ]
    for task, spec in tasks.items():
        task_spec = spec["spec"]
        plain = [row for p in spec["partitions"] for row in rows[(task, p)] if row.algorithm not in task_spec.get("overrides", {})]
        first = next((r for row in plain for r in row.results.values()), None)  # the budget paragraph's run
        lines += [f"## {task_spec['title']}", ""]
        if first is not None:
            config = yaml.safe_load((Path(first.summary["run_dir"]) / "config.yaml").read_text())
            lines += [budget(config, first.summary, _family_rates(record, task)), ""]
        for algorithm, settings in task_spec.get("overrides", {}).items():
            lines += [f"{algorithm}'s runs also set {', '.join(f'`{x}`' for x in settings)}.", ""]
        lines += [note for paragraph in task_spec.get("notes", []) for note in (paragraph, "")]
        sweep = sweep_table(record.get("sweep", {}), task, _families(record, task))
        if sweep:
            lines += ["Validation metric of each family's representative per peak learning rate (**chosen**):", "", *sweep, ""]
        for partition in spec["partitions"]:
            lines += [f"### {task} / {partition}", ""]
            lines += _partition_budget(task_spec["partitions"].get(partition, []), rows[(task, partition)], config if first else None)
            lines += [*partition_table(record, task, rows[(task, partition)]), ""]
            lines += findings(record, task, partition, rows[(task, partition)]) + [""]
        if task in plots:
            lines += [f"![{task}: global {label(task_spec['metric'])} against rounds and megabytes sent]({plots[task]})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _families(record: dict, task: str) -> list[str]:
    chosen = ((record.get("sweep") or {}).get("chosen") or {}).get(task) or {}
    return list(chosen)


def _family_rates(record: dict, task: str) -> dict[str, float]:
    return record["tasks"][task]["learning_rates"]


def as_json(record: dict, rows: dict[tuple[str, str], list[Row]]) -> dict:
    """Every row's statistics and every run's final figures and curve (docs/algorithms.json)."""
    out: dict[str, Any] = {}
    for (task, partition), group in rows.items():
        spec = record["tasks"][task]["spec"]
        metric = spec["metric"]
        reference = next((r for r in group if r.algorithm == spec["reference"] and r.results), None)
        for row in group:
            key = f"{task}/{partition}/{row.algorithm}"
            entry: dict[str, Any] = {"failed": row.failures} if row.failures else {}
            if row.results:
                for scope in ("global", "local"):
                    for name in [metric, *spec["also"]]:
                        interval = row.interval(scope, name)
                        entry[f"{scope}_{name}"] = {
                            "mean": interval.mean,
                            "ci95": interval.half,
                            "n": interval.n,
                            "se": row.se(scope, name),
                        }
                    if reference is not None and row is not reference:
                        delta = row.difference(reference, scope, metric)
                        entry[f"{scope}_{metric}_minus_{spec['reference']}"] = {"mean": delta.mean, "ci95": delta.half, "n": delta.n}
                entry["runs"] = {
                    str(seed): {
                        "final_global": r.summary["final_global"],
                        "final_local": r.summary["final_local"],
                        "curve": r.curve(metric),
                        "bytes_up_total": r.summary["bytes_up_total"],
                        "bytes_down_total": r.summary["bytes_down_total"],
                        "seconds": r.times.get("seconds"),
                        "cpu_seconds": r.times.get("cpu_seconds"),
                    }
                    for seed, r in row.results.items()
                }
            out[key] = _finite(entry)
    return out


def _finite(value):
    """nan -> None, so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
