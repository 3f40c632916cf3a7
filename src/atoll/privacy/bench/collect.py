"""What one cell of the security matrix measured, read back from its run directory: the final
global metric and loss, the attack's success rate, the membership and reconstruction scores, the
privacy spent, and the cost (CPU and wall seconds, bytes uploaded per round)."""

from __future__ import annotations

import json
from pathlib import Path

from atoll.report.bench.runner import CELL_TIMES

MEMBERSHIP_SCORES = ("loss", "zlib", "mink", "reference")


def _records(directory: Path) -> list[dict]:
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _membership(protection: dict, target: str) -> dict:
    """Each membership score's AUC and TPR at the configured FPR against ``target`` (global or victim)."""
    return {
        score: {"auc": protection[f"membership_{target}_{score}_auc"], "tpr": protection.get(f"membership_{target}_{score}_tpr")}
        for score in MEMBERSHIP_SCORES
        if f"membership_{target}_{score}_auc" in protection
    }


def collect(directory: Path) -> dict:
    """The measurements of the finished run in ``directory`` (flat, JSON-ready)."""
    summary = json.loads((directory / "summary.json").read_text())
    times = json.loads((directory / CELL_TIMES).read_text()) if (directory / CELL_TIMES).is_file() else {}
    protection = summary.get("protection", {})
    final = summary.get("final_global") or {}
    metric = summary.get("metric", "accuracy")
    rounds = [r for r in _records(directory) if r.get("round", 0) > 0]
    # under secure aggregation the masked vector is what a client uploads: the protocol's bytes replace the plain upload
    uploaded = [
        r["protection"]["secagg_bytes_up"] if "secagg_bytes_up" in r.get("protection", {}) else r.get("bytes_up", 0) for r in rounds
    ]
    row = {
        "metric": metric,
        "value": final.get(metric),
        "loss": final.get("loss"),
        "initial_value": (summary.get("initial_global") or {}).get(metric),
        "rounds": len(rounds),
        "stopped_early": summary.get("stopped_early"),
        "attack_success_rate": protection.get("attack_success_rate"),
        "attack_target_rate_untriggered": protection.get("attack_target_rate_untriggered"),
        "robust_attackers_kept": protection.get("robust_attackers_kept"),
        "robust_kept": protection.get("robust_kept"),
        "epsilon": protection.get("dp_epsilon", protection.get("dpsgd_epsilon")),
        "epsilon_kind": "client-level" if "dp_epsilon" in protection else ("example-level" if "dpsgd_epsilon" in protection else None),
        "secagg_failed_rounds": sum(r.get("protection", {}).get("secagg_failed", 0.0) for r in rounds) if uploaded else None,
        "membership_global": _membership(protection, "global"),
        "membership_victim": _membership(protection, "victim"),
        "reconstruction": {
            k.removeprefix("reconstruction_"): v
            for k, v in protection.items()
            if k.startswith("reconstruction_rouge") or k == "reconstruction_exact"
        },
        "upload_bytes_per_round": sum(uploaded) / len(uploaded) if uploaded else None,
        "cpu_seconds": times.get("cpu_seconds"),
        "seconds": times.get("seconds"),
        "load": [times.get("load_start"), times.get("load_end")],
    }
    return row
