"""``atoll split bench``: attack × defense × cut-point grids. Every cell is one split run (a cut
and one defense setting, or none) whose transcript every applicable attack is run on; the bench
records main-task performance (MP), attack performance (AP) and the defense capability score,
renders them as a table into a Markdown file and a trade-off plot.

DCS (VFLAIR-LLM, Gu et al., KDD 2025): DCS = 1 / (1 + √((1 − β)(AP − AP*)² + β(MP − MP*)²)), with
AP* the attack's ideal value against a perfect defense (0 token recall for inversions, 0.5 AUC,
the majority-class rate for label recovery) and MP* the main-task performance without defense at
the same cut. T-DCS averages DCS over the attacks of one target (inputs, labels); C-DCS averages
the T-DCS.

Resumable: each finished cell is one line of ``OUT/bench.jsonl``; a killed bench continues with
the cells not yet there (a cell cut short is run again from its start).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field

from atoll.errors import ConfigError

START = "<!-- split-bench:start -->"
END = "<!-- split-bench:end -->"


class CutSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    partition: str = Field("head-tail", description="head-tail or head-body-tail")
    head_blocks: int = Field(1, ge=0)
    tail_blocks: int = Field(0, ge=0)
    overrides: dict[str, Any] = Field(default_factory=dict, description="more keys of the split config for this cut (dotted)")
    model: str | None = Field(None, description="the model of this cut's runs, if not the base config's (shown in the table)")

    @property
    def label(self) -> str:
        if self.partition == "head-tail":
            cut = f"head-tail, {self.head_blocks} head block{'s' if self.head_blocks != 1 else ''}"
        else:
            cut = f"head-body-tail, {self.head_blocks} head + {self.tail_blocks} tail"
        return f"{self.model}, {cut}" if self.model else cut


class DefenseSweep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    label: str | None = Field(None, description="how the table names this sweep (default: the defense's name)")
    param: str | None = Field(None, description="the main parameter swept (None: one setting)")
    values: list[Any] = Field(default_factory=list)
    fixed: dict[str, Any] = Field(default_factory=dict, description="other parameters of the defense")
    more_private: str = Field("lower", description="'lower' or 'higher': which way of the parameter protects more")
    cuts: list[int] | None = Field(None, description="indices of the cuts this defense runs at (None: all)")


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "split-bench"
    base: dict[str, Any] = Field(default_factory=dict, description="the split config every cell starts from")
    cuts: list[CutSpec]
    defenses: list[DefenseSweep]
    attacks: list[dict[str, Any]]
    beta: float = Field(0.5, ge=0, le=1, description="DCS weight of the main task against the attack")


def load_bench_config(path: Path) -> BenchConfig:
    if not path.is_file():
        raise ConfigError(f"bench config '{path}' does not exist", "see configs/split/bench.yaml")
    from pydantic import ValidationError

    try:
        bench = BenchConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as error:
        raise ConfigError(f"bench config '{path}' is not valid YAML ({str(error).splitlines()[0]})") from None
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "config"
        raise ConfigError(f"bench config '{path}': {key}: {first['msg']}", "see configs/split/bench.yaml") from None
    try:
        check_cells(bench)
    except ConfigError as error:
        raise ConfigError(f"bench config '{path}': {error.message}", error.fix) from None
    return bench


def check_cells(bench: BenchConfig) -> None:
    """Every cell's split config and every attack's parameters are valid, before anything runs
    (no torch: a bad grid is refused without writing anything)."""
    from atoll.split.config import build_split_config
    from atoll.split.plugins import parse_plugin_params

    for attack in bench.attacks:
        if "name" not in attack:
            raise ConfigError("every attack needs a name", "see `atoll split list attacks`")
        parse_plugin_params("attack", attack["name"], {k: v for k, v in attack.items() if k != "name"}, attack["name"])
    for cell in cells(bench):
        build_split_config({**cell_tree(bench, cell, Path("runs")), "attacks": []})


# -- the cells --------------------------------------------------------------------------------------


def cells(bench: BenchConfig) -> list[dict[str, Any]]:
    """Every (cut, defense setting) of the grid, with a stable id."""
    result = []
    for cut_index in range(len(bench.cuts)):
        result.append({"id": f"cut{cut_index}/none", "cut": cut_index, "defense": None, "param": None, "value": None})
        for sweep_index, sweep in enumerate(bench.defenses):
            if sweep.cuts is not None and cut_index not in sweep.cuts:
                continue
            label = sweep.label or sweep.name
            for value in sweep.values or [None]:
                tag = label + (f"@{sweep.param}={value}" if sweep.param else "")
                result.append(
                    {
                        "id": f"cut{cut_index}/{tag}",
                        "cut": cut_index,
                        "sweep": sweep_index,
                        "defense": label,
                        "param": sweep.param,
                        "value": value,
                    }
                )
    return result


def cell_tree(bench: BenchConfig, cell: dict[str, Any], out: Path) -> dict[str, Any]:
    """The split config tree of one cell."""
    from atoll.config import apply_override

    tree = json.loads(json.dumps(bench.base))
    cut = bench.cuts[cell["cut"]]
    tree.setdefault("split", {}).update({"partition": cut.partition, "head_blocks": cut.head_blocks, "tail_blocks": cut.tail_blocks})
    if cut.model:
        tree.setdefault("model", {})["name"] = cut.model
    for key, value in cut.overrides.items():
        apply_override(tree, f"{key}={json.dumps(value)}")
    defenses = []
    if cell["defense"] is not None:
        sweep = bench.defenses[cell["sweep"]]
        spec = {"name": sweep.name, **sweep.fixed}
        if sweep.param:
            spec[sweep.param] = cell["value"]
        defenses.append(spec)
    tree["defenses"] = defenses
    tree["attacks"] = [dict(a) for a in bench.attacks]
    slug = re.sub(r"[^A-Za-z0-9.=@-]+", "_", cell["id"])
    tree.setdefault("run", {}).update({"dir": str(out / "runs" / slug), "plots": False})
    tree["name"] = slug
    return tree


def applicable_attacks(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """The attacks of ``tree`` that can run on its cut and task (the others' check() refuses)."""
    from atoll.data.sources import load_source
    from atoll.data.tasks import resolve_task
    from atoll.split.config import build_split_config
    from atoll.split.models import head_kind
    from atoll.split.plugins import parse_plugin_params, plugin_class

    config = build_split_config({**tree, "attacks": []})
    task = "qa" if config.data.task == "qa" else resolve_task(config.data, load_source(config.data.source)).kind
    kept = []
    for attack in tree["attacks"]:
        params = parse_plugin_params("attack", attack["name"], {k: v for k, v in attack.items() if k != "name"}, attack["name"])
        try:
            plugin_class("attack", attack["name"]).check(params, config.split.partition, head_kind(task))
        except ConfigError:
            continue
        kept.append(attack)
    return kept


def main_metric(final: dict[str, float]) -> tuple[str, float]:
    for key in ("accuracy", "f1", "token_accuracy"):
        if key in final:
            return key, float(final[key])
    return "loss", float(final.get("loss", math.nan))


def attack_value(name: str, result: dict[str, float]) -> tuple[str, float]:
    """The attack performance (AP) figure of one attack's result."""
    for key in ("token_recall", "recovery_rate", "auc"):
        if key in result:
            return key, float(result[key])
    return "none", math.nan


def run_cell(bench: BenchConfig, cell: dict[str, Any], out: Path) -> dict[str, Any]:
    from atoll.split.config import build_split_config
    from atoll.split.runner import run_split

    tree = cell_tree(bench, cell, out)
    run_dir = Path(tree["run"]["dir"])
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a cell cut short by a kill starts again
    record: dict[str, Any] = {**cell, "cut_label": bench.cuts[cell["cut"]].label}
    try:
        tree["attacks"] = applicable_attacks(tree)
        config = build_split_config(tree)
        started, cpu_started = time.perf_counter(), time.process_time()
        _, summary = run_split(config, say=lambda _: None)
    except ConfigError as error:
        record["skipped"] = str(error)
        return record
    except Exception as error:  # a failing cell is recorded and the grid goes on; delete its line to rerun it
        record["skipped"] = f"failed: {type(error).__name__}: {error}"
        return record
    metric, value = main_metric(summary["final"])
    record.update(
        {
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
            "main_metric": metric,
            "mp": value,
            "majority_class_rate": summary.get("majority_class_rate"),
            "attacks": {k: v for k, v in summary["attacks"].items() if k != "knowledge_used"},
            "defense_report": {k: v for k, v in summary["final"].items() if k.startswith("defense.")},
        }
    )
    return record


def read_records(out: Path) -> list[dict[str, Any]]:
    path = out / "bench.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_bench(bench: BenchConfig, out: Path, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every cell not yet in ``out/bench.jsonl``; returns all records."""
    import torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_records(out)}
    todo = [c for c in cells(bench) if c["id"] not in done]
    say(f"{len(done)} cells done, {len(todo)} to run")
    for index, cell in enumerate(todo, 1):
        record = run_cell(bench, cell, out)
        record["load_average"] = os.getloadavg()[0]
        with open(out / "bench.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        shown = record.get("skipped") or f"MP {record['mp']:.3f}, " + ", ".join(
            f"{name} {attack_value(name, result)[1]:.3f}" for name, result in record["attacks"].items()
        )
        say(f"[{index}/{len(todo)}] {cell['id']}: {shown} ({record.get('seconds', 0):.0f} s)")
    return read_records(out)


# -- scores and the table -----------------------------------------------------------------------------


def ideal_attack_value(name: str, result_key: str, record: dict[str, Any]) -> float:
    """AP*: what the attack scores against a perfect defense."""
    if result_key == "auc":
        return 0.5
    if result_key == "recovery_rate":
        return float(record.get("majority_class_rate") or 0.0)
    return 0.0


def dcs(ap: float, ap_ideal: float, mp: float, mp_ideal: float, beta: float) -> float:
    """Defense capability score (VFLAIR-LLM): 1 / (1 + √((1−β)(AP−AP*)² + β(MP−MP*)²))."""
    return 1.0 / (1.0 + math.sqrt((1 - beta) * (ap - ap_ideal) ** 2 + beta * (mp - mp_ideal) ** 2))


def scores(records: list[dict[str, Any]], beta: float) -> list[dict[str, Any]]:
    """Each record with DCS per attack, T-DCS per target and C-DCS (MP* = no defense at its cut)."""
    from atoll.split.plugins import plugin_class

    baseline = {r["cut"]: r["mp"] for r in records if r["defense"] is None and "mp" in r}
    scored = []
    for record in records:
        if "mp" not in record:
            scored.append(record)
            continue
        per_attack, by_target = {}, {}
        for name, result in record["attacks"].items():
            key, value = attack_value(name, result)
            if math.isnan(value):
                continue
            mp_ideal = baseline.get(record["cut"], record["mp"])
            mp_ideal = max(mp_ideal, record["mp"])  # a defense that helps the task loses nothing
            score = dcs(value, ideal_attack_value(name, key, record), record["mp"], mp_ideal, beta)
            per_attack[name] = score
            by_target.setdefault(plugin_class("attack", name.split("#")[0]).target, []).append(score)
        target_dcs = {t: sum(v) / len(v) for t, v in by_target.items()}
        scored.append(
            {**record, "dcs": per_attack, "t_dcs": target_dcs, "c_dcs": sum(target_dcs.values()) / len(target_dcs) if target_dcs else None}
        )
    return scored


ATTACK_SHORT = {
    "white-box-inversion": "VMI",
    "relaxation-inversion": "RMI",
    "bisr": "BiSR",
    "batch-label-inference": "BLI",
    "norm-scoring": "NS",
}


def render_table(bench: BenchConfig, records: list[dict[str, Any]], command: str, note: str) -> str:
    """The Markdown block written between the bench markers."""
    order = {cell["id"]: index for index, cell in enumerate(cells(bench))}  # the grid's order, not the order cells ran in
    scored = sorted(scores(records, bench.beta), key=lambda r: order.get(r.get("id"), len(order)))
    attack_names = [a["name"] for a in bench.attacks]
    lines = [START, "", f"Made by `{command}`. {note}", ""]
    for cut_index, cut in enumerate(bench.cuts):
        rows = [r for r in scored if r["cut"] == cut_index]
        if not rows:
            continue
        present = [n for n in attack_names if any(n in r.get("attacks", {}) for r in rows)]
        metric = next((r["main_metric"] for r in rows if "main_metric" in r), "MP")
        lines.append(f"**{cut.label}** (MP = test {metric}; AP: token recall for VMI/RMI/BiSR, recovery rate for BLI, AUC for NS)")
        lines.append("")
        header = ["defense", "setting", "MP"] + [f"{ATTACK_SHORT.get(n, n)} AP" for n in present]
        header += [f"{ATTACK_SHORT.get(n, n)} DCS" for n in present] + ["T-DCS inputs", "T-DCS labels", "C-DCS"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in rows:
            setting = f"{r['param']} = {r['value']}" if r.get("param") else ""
            if "skipped" in r:
                lines.append(f"| {r['defense']} | {setting} | n/a: {r['skipped']} |" + " |" * (len(header) - 3))
                continue
            cells_ = [r["defense"] or "none", setting, f"{r['mp']:.3f}"]
            cells_ += [f"{attack_value(n, r['attacks'][n])[1]:.3f}" if n in r["attacks"] else "" for n in present]
            cells_ += [f"{r['dcs'][n]:.3f}" if n in r.get("dcs", {}) else "" for n in present]
            cells_ += [f"{r['t_dcs'][t]:.3f}" if t in r.get("t_dcs", {}) else "" for t in ("inputs", "labels")]
            cells_.append(f"{r['c_dcs']:.3f}" if r.get("c_dcs") is not None else "")
            lines.append("| " + " | ".join(cells_) + " |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_into(doc: Path, block: str) -> None:
    """Replace the bench block of ``doc`` (between the markers), or append it."""
    text = doc.read_text() if doc.is_file() else ""
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def plot_tradeoff(bench: BenchConfig, records: list[dict[str, Any]], path: Path) -> None:
    """Main task (x) against attack performance (y), one panel per attack, one colour per cut;
    a defense's settings are joined by a line, the undefended run is a black star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attack_names = [a["name"] for a in bench.attacks if any(a["name"] in r.get("attacks", {}) for r in records)]
    figure, axes = plt.subplots(1, len(attack_names), figsize=(4.2 * len(attack_names), 4.2), squeeze=False)
    markers = "osD^v<>phX*P"
    defenses = list(dict.fromkeys(d.label or d.name for d in bench.defenses))
    for axis, name in zip(axes[0], attack_names):
        for cut_index in range(len(bench.cuts)):
            colour = f"C{cut_index}"
            rows = [r for r in records if r["cut"] == cut_index and name in r.get("attacks", {})]
            for defense_index, defense in enumerate(defenses):
                points = [(r["mp"], attack_value(name, r["attacks"][name])[1]) for r in rows if r["defense"] == defense]
                if points:
                    axis.plot(*zip(*points), marker=markers[defense_index % len(markers)], color=colour, alpha=0.7, lw=0.8, ms=5)
            base = [(r["mp"], attack_value(name, r["attacks"][name])[1]) for r in rows if r["defense"] is None]
            if base:
                axis.plot(*zip(*base), "*", color="black", ms=12, label="no defense" if cut_index == 0 else None)
        key = next((attack_value(name, r["attacks"][name])[0] for r in records if name in r.get("attacks", {})), "AP")
        axis.set_title(ATTACK_SHORT.get(name, name))
        axis.set_xlabel("main task (MP)")
        axis.set_ylabel(f"attack ({key})")
        axis.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=f"C{i}", lw=2) for i in range(len(bench.cuts))]
    handles += [plt.Line2D([], [], color="gray", marker=markers[i % len(markers)], lw=0) for i in range(len(defenses))]
    labels = [c.label for c in bench.cuts] + defenses
    figure.legend(handles, labels, loc="upper center", ncol=min(6, len(labels)), fontsize=7, bbox_to_anchor=(0.5, 1.12))
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
