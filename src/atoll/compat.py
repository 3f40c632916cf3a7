"""The one compatibility check: what a run asks of its algorithm, against what the algorithm
declares it supports (:class:`~atoll.fl.capabilities.Capabilities`), for every engine and paradigm.

No algorithm module is imported and no method is inspected: the declarations in
:mod:`atoll.algorithms.catalog` are the whole truth. Each refusal is one ConfigError line naming
what does not fit and what would.
"""

from __future__ import annotations

from atoll.algorithms.catalog import SPECS
from atoll.config import Config
from atoll.errors import ConfigError
from atoll.fl.capabilities import AlgorithmSpec


def names_with(capability: str) -> str:
    """Comma-separated names of the algorithms that declare ``capability`` (for the fix text)."""
    return ", ".join(sorted(name for name, spec in SPECS.items() if getattr(spec.capabilities, capability)))


def _mixed_rank_names() -> str:
    return ", ".join(sorted(name for name, spec in SPECS.items() if spec.capabilities.mixed_ranks != "refuse"))


def check_ranks(spec: AlgorithmSpec, ranks: set[int], fix: str | None = None) -> None:
    """Different client ranks need an algorithm whose aggregation handles them."""
    if len(ranks) > 1 and spec.capabilities.mixed_ranks == "refuse":
        raise ConfigError(
            f"algorithm '{spec.name}' cannot aggregate different LoRA ranks {sorted(ranks)}",
            fix or f"give every client the same rank (model.lora.client_ranks) or use {_mixed_rank_names()}",
        )


def check_personal_export(config: Config, spec: AlgorithmSpec) -> None:
    """``run.export_personal`` needs a personal model that is one LoRA, trained in this process."""
    if not config.run.export_personal:
        return
    if not spec.capabilities.personal_export:
        raise ConfigError(
            f"run.export_personal: algorithm '{spec.name}' has no personal model that is one LoRA adapter",
            f"drop run.export_personal or use one of: {names_with('personal_export')}",
        )
    if config.engine != "local" or config.realistic.dry_run:
        where = "engine: flower keeps personal state on the nodes" if config.engine != "local" else "a dry run trains nothing"
        raise ConfigError(f"run.export_personal needs the local engine with training ({where})", "drop run.export_personal")


def check_paradigm(config: Config, spec: AlgorithmSpec, ranks: set[int]) -> None:
    """Realistic mode's asynchronous paradigms need an asynchronous rule (for these ranks)."""
    settings = config.realistic
    if not settings.asynchronous:
        return
    if not spec.capabilities.asynchronous:
        raise ConfigError(
            f"algorithm '{spec.name}' cannot run asynchronously (realistic.paradigm {settings.paradigm})",
            "use realistic.paradigm sync or sequential, or an algorithm that supports async",
        )
    if len(ranks) > 1 and not spec.capabilities.async_mixed_ranks:
        raise ConfigError(
            f"algorithm '{spec.name}' has no asynchronous rule for different LoRA ranks {sorted(ranks)}",
            "use realistic.paradigm sync or sequential, or one rank for every client",
        )


def check_stages(config: Config, spec: AlgorithmSpec) -> None:
    """Each protection stage in ``federation.stages`` against the capabilities it requires (a
    robust rule in place of the mean, secure aggregation or central DP need a weighted-mean
    aggregation, say)."""
    from atoll.fl.stages import STAGES

    for name in config.federation.stages:
        missing = sorted(capability for capability in STAGES[name].requires if not getattr(spec.capabilities, capability))
        if missing:
            raise ConfigError(
                f"protection stage '{name}' needs an algorithm whose capabilities include {', '.join(missing)}; '{spec.name}' does not",
                f"use one of: {names_with(missing[0])}",
            )


def check_engine(config: Config, spec: AlgorithmSpec) -> None:
    """What the Flower engine asks of an algorithm: no pooled data; a weighted-mean aggregation
    under secure aggregation or central DP (both only ever show the algorithm a mean). What
    ``privacy:``, ``robust:`` and ``attack:`` ask of Flower (and of the algorithm there, such as
    ``client_state``) is :func:`atoll.privacy.checks.check_on_flower`, run with the other
    protection checks."""
    if config.engine != "flower":
        return
    if spec.capabilities.pooled_data:
        raise ConfigError(
            f"algorithm '{spec.name}' pools every client's data in one place, which a federation cannot do", "run it with engine: local"
        )
    flower = config.flower
    if flower.secagg.enabled and not spec.capabilities.weighted_mean:
        raise ConfigError(
            f"algorithm '{spec.name}' cannot run under SecAgg+: the server only learns the weighted mean of the uploads, "
            "and this algorithm's aggregation needs the individual updates",
            f"use one of: {names_with('weighted_mean')}; or switch secagg off",
        )
    if flower.dp.mode != "none" and not spec.capabilities.weighted_mean:
        raise ConfigError(
            f"algorithm '{spec.name}' cannot run under Flower's DP wrappers: their noise is calibrated to a mean of clipped "
            "updates, and this algorithm's aggregation is not such a mean",
            f"use one of: {names_with('weighted_mean')}; or set flower.dp.mode: none",
        )
