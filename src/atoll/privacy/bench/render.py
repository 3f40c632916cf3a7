"""The security matrix as markdown tables (one per task) and plots, written into docs/security.md
between markers so the rest of the page stays hand-written; the rows also go to a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

START = "<!-- atoll bench security: start (generated; edit configs/bench/security.yaml and re-run) -->"
END = "<!-- atoll bench security: end -->"


def _number(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and (value >= 1e4 or 0 < abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _membership(row: dict, target: str) -> str:
    scores = row.get(f"membership_{target}") or {}
    if not scores:
        return ""
    parts = [f"{scores[s]['auc']:.2f}" for s in ("loss", "reference") if s in scores]
    tpr = scores.get("reference", scores.get("loss", {})).get("tpr")
    return " / ".join(parts) + (f" ({tpr:.2f})" if tpr is not None else "")


COLUMNS: list[tuple[str, str, callable]] = [
    ("metric", "final {metric}", lambda r: _number(r.get("value"))),
    ("loss", "final loss", lambda r: _number(r.get("loss")) if r.get("metric") != "loss" else ""),
    ("asr", "attack success", lambda r: _number(r.get("attack_success_rate"), 2)),
    ("control", "target rate without trigger", lambda r: _number(r.get("attack_target_rate_untriggered"), 2)),
    ("kept", "attackers kept (last round)", lambda r: _number(r.get("robust_attackers_kept"))),
    ("eps", "ε (δ = 1e-5)", lambda r: _number(r.get("epsilon")) + (" (example)" if r.get("epsilon_kind") == "example-level" else "")),
    ("mia_g", "MIA global AUC loss / ref (TPR@1% ref)", lambda r: _membership(r, "global")),
    ("mia_v", "MIA victim AUC loss / ref (TPR@1% ref)", lambda r: _membership(r, "victim")),
    (
        "rouge",
        "reconstruction ROUGE-1 / 2 / L (exact)",
        lambda r: (
            (
                " / ".join(f"{r['reconstruction'][k]:.2f}" for k in ("rouge1", "rouge2", "rougeL") if k in r["reconstruction"])
                + (f" ({r['reconstruction']['exact']:.2f})" if "exact" in r["reconstruction"] else "")
            )
            if r.get("reconstruction")
            else ""
        ),
    ),
    ("bytes", "upload MB / round", lambda r: f"{r['upload_bytes_per_round'] / 1e6:.3f}" if r.get("upload_bytes_per_round") else ""),
    ("cpu", "CPU s", lambda r: f"{r['cpu_seconds']:.0f}" if r.get("cpu_seconds") is not None else ""),
    ("wall", "wall s", lambda r: f"{r['seconds']:.0f}" if r.get("seconds") is not None else ""),
]


def task_table(task: str, title: str, results: dict[str, dict]) -> str:
    """The markdown table of one task: a row per cell, only the columns some cell measured."""
    measured = [r["row"] for r in results.values() if "row" in r]
    metric = next((r["metric"] for r in measured), "metric")
    shown = [c for c in COLUMNS if any(c[2](r) for r in measured)]
    header = ["protection", "attack", *(name.format(metric=metric) for _, name, _ in shown)]
    lines = [f"#### {task}: {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results.values():
        cells = [result["protection"], result["attack"]]
        if "row" in result:
            cells += [c[2](result["row"]) for c in shown]
            note = result["row"].get("stopped_early")
            if note:
                cells[-1] += f" (stopped: {note})"
        else:
            status = "refused" if "refused" in result else "failed" if "failed" in result else "not run"
            reason = result.get("refused") or result.get("failed") or ""
            cells += [f"{status}: {reason}".replace("|", "/")] + [""] * (len(shown) - 1)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(task: str, results: dict[str, dict], path: Path) -> bool:
    """Grouped bars per protection (one bar per attack) of each measured quantity; False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {k: r for k, r in results.items() if "row" in r}
    if not measured:
        return False
    metric = next(iter(measured.values()))["row"]["metric"]
    panels = [
        (f"final {metric}", lambda r: r.get("value")),
        ("attack success rate", lambda r: r.get("attack_success_rate")),
        ("membership AUC (global, reference)", lambda r: (r.get("membership_global") or {}).get("reference", {}).get("auc")),
        ("reconstruction ROUGE-L", lambda r: (r.get("reconstruction") or {}).get("rougeL")),
    ]
    panels = [p for p in panels if any(p[1](r["row"]) is not None for r in measured.values())]
    if not panels:
        return False
    protections = list(dict.fromkeys(r["protection"] for r in results.values()))
    attacks = list(dict.fromkeys(r["attack"] for r in results.values()))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    width = 0.8 / len(attacks)
    for axis, (name, value) in zip(axes[0], panels):
        for j, attack in enumerate(attacks):
            xs, ys = [], []
            for i, protection in enumerate(protections):
                result = results.get(f"{task}/{protection}--{attack}", {})
                v = value(result["row"]) if "row" in result else None
                if v is not None:
                    xs.append(i + (j - (len(attacks) - 1) / 2) * width)
                    ys.append(v)
            axis.bar(xs, ys, width=width, label=attack)
        axis.set_xticks(range(len(protections)), protections, rotation=30, ha="right", fontsize=8)
        axis.set_xlim(-0.5, len(protections) - 0.5)
        axis.set_title(name, fontsize=9)
        axis.set_ylim(0, max(1.0, axis.get_ylim()[1]))
    axes[0][0].legend(title="attack", fontsize=7, title_fontsize=7)
    figure.suptitle(f"atoll bench security: {task}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_doc(doc: Path, body: str) -> None:
    """Put ``body`` between the markers of ``doc`` (appended with its markers when they are absent)."""
    text = doc.read_text() if doc.is_file() else "# Privacy and robustness\n"
    block = f"{START}\n{body.strip()}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## The attack x protection matrix (`atoll bench security`)\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def render(record: dict, results: dict[str, dict], doc: Path) -> list[Path]:
    """Tables and plots of ``results`` (key -> {protection, attack, row | refused | failed}) into ``doc``."""
    written = []
    parts = [
        f"Made by `{record['command']}` (matrix: `{record['matrix']}`).",
        "",
        f"Machine: {record['machine_note']}",
        "",
    ]
    for task, spec in record["tasks"].items():
        mine = {k: r for k, r in results.items() if k.startswith(f"{task}/")}
        picture = doc.parent / f"security-{task}.png"
        parts += [task_table(task, spec["title"], mine), ""]
        if draw(task, mine, picture):
            parts += [f"![{task}: the matrix]({picture.name})", ""]
            written.append(picture)
        parts += [f"Overrides of every {task} run: `{' '.join(spec['set'])}`.", ""]
    write_doc(doc, "\n".join(parts))
    data = doc.with_name("security-bench.json")
    data.write_text(json.dumps({"record": record, "results": results}, indent=1, sort_keys=True) + "\n")
    return [doc, data, *written]
