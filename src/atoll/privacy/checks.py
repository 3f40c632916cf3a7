"""The resolve step's checks of ``privacy:``, ``robust:`` and ``attack:`` (no torch), and the
effective settings they imply.

:func:`check_protections` refuses, with one line each, what cannot work: client-level DP or secure
aggregation for an algorithm whose aggregation is not a weighted linear mean (the ``weighted_mean``
capability: noise on a sum, or a sum the server cannot look inside, stand in for the individual
updates only then), robust rules under secure aggregation except norm bounding, protections of a
round's sum with paradigms that aggregate one update at a time; :func:`check_on_flower` refuses
what cannot work on the Flower engine. :func:`effective_settings` returns the run's effective config: the noise multiplier solved
from a target ε (this alone imports opacus, and with it torch).
"""

from __future__ import annotations

import math

from atoll.config import Config
from atoll.errors import ConfigError
from atoll.fl.capabilities import AlgorithmSpec
from atoll.privacy.attacks.selection import choose_attackers

MEAN_RULES = ("median", "trimmed-mean", "fltrust")  # robust rules that replace the mean with another vector
COLLUDING_ATTACKS = ("alie", "min-max")  # need the honest updates of at least two colluders
CRAFTED_FROM_COLLUDERS = ("alie", "ipm", "min-max")  # crafted from every colluder's honest update


def sampled_clients(config: Config) -> int:
    """Clients sampled per round: ceil(sample_rate * clients), at least 1 (BaseServer's rule)."""
    federation = config.federation
    return max(1, int(math.ceil(federation.sample_rate * federation.clients - 1e-9)))


def secagg_threshold(config: Config, participants: int | None = None) -> int:
    """The unmasking threshold t for a round of ``participants`` clients (default: the sampled count)."""
    threshold = config.privacy.secagg.threshold
    count = sampled_clients(config) if participants is None else participants
    if isinstance(threshold, float) and threshold <= 1:
        return max(1, int(math.ceil(threshold * count - 1e-9)))
    return int(threshold)


def attackers(config: Config) -> list[int]:
    """The attacking clients: ``attack.clients``, or a seeded fraction of the federation."""
    attack = config.attack
    if attack.kind == "none":
        return []
    return choose_attackers(config.federation.clients, attack.fraction, attack.clients, config.seed)


def _names_with_mean() -> str:
    from atoll.compat import names_with

    return names_with("weighted_mean")


def check_protections(config: Config, spec: AlgorithmSpec, ranks: set[int]) -> None:
    """Refuse protections and attacks that cannot work for this algorithm, engine and paradigm."""
    privacy, robust, attack = config.privacy, config.robust, config.attack
    dp, secagg = privacy.dp, privacy.secagg
    capabilities = spec.capabilities
    aggregating = dp.enabled or secagg.enabled or robust.rule != "none"
    if config.engine == "flower":
        check_on_flower(config, spec)
    if aggregating and config.mode == "realistic" and config.realistic.paradigm != "sync":
        raise ConfigError(
            f"privacy.dp, privacy.secagg and robust.rule act on a round's set of updates; realistic.paradigm "
            f"{config.realistic.paradigm} aggregates one update (or one buffer) at a time",
            "use realistic.paradigm: sync",
        )
    if capabilities.pooled_data and (aggregating or attack.kind != "none"):
        raise ConfigError(f"algorithm '{spec.name}' pools every client's data: there are no updates to protect or attack")
    if dp.enabled:
        _check_dp(config, spec)
    if secagg.enabled:
        _check_secagg(config, spec)
    if robust.rule != "none":
        _check_robust(config, spec, ranks)
    if robust.validation.enabled and secagg.enabled:
        raise ConfigError(
            "robust.validation checks each update, but under privacy.secagg the server sees only their sum", "switch one of them off"
        )
    _check_attack(config)


def check_on_flower(config: Config, spec: AlgorithmSpec) -> None:
    """What ``privacy:``, ``robust:`` and ``attack:`` cannot do on ``engine: flower``, one line each.

    On Flower the server-side stages run in the ServerApp and the client-side ones in each node's
    ClientApp, which shares nothing with the server but the messages (see docs/security.md, "On
    Flower"). Everything not refused here runs there as on the local engine."""
    privacy, robust, attack, flower = config.privacy, config.robust, config.attack, config.flower
    dp, secagg = privacy.dp, privacy.secagg
    flower_dp, flower_secagg = flower.dp.mode != "none", flower.secagg.enabled
    if secagg.enabled:
        raise ConfigError(
            "privacy.secagg runs atoll's own Bonawitz et al. protocol between clients in one process; on Flower the clients mask "
            "with Flower's SecAgg+",
            "use flower.secagg.enabled: true instead of privacy.secagg",
        )
    if dp.enabled and (flower_dp or flower_secagg):
        which = "flower.dp adds its own clipping and noise" if flower_dp else "under flower.secagg the ServerApp sees only the mean"
        raise ConfigError(
            f"privacy.dp clips each update and adds noise to their sum on the server, and {which}",
            "choose privacy.dp or flower.dp, without flower.secagg",
        )
    if dp.mode == "adaptive" and dp.clip_at == "client":
        raise ConfigError(
            "privacy.dp adaptive clipping at the client needs the bound the server moves every round, which the ClientApps are not sent",
            "use privacy.dp.clip_at: server (or mode: fixed) on Flower",
        )
    if robust.rule != "none" and (flower_dp or flower_secagg):
        which = "flower.secagg shows the ServerApp only the mean" if flower_secagg else "flower.dp's noise is calibrated to a plain mean"
        raise ConfigError(
            f"robust.rule {robust.rule} needs the individual updates in place of their mean, and {which}",
            "switch off flower.secagg / flower.dp, or the robust rule",
        )
    if robust.validation.enabled and flower_secagg:
        raise ConfigError(
            "robust.validation checks each update, but under flower.secagg the ServerApp sees only their masked sum",
            "switch off flower.secagg or robust.validation",
        )
    colluders = len(attackers(config)) if attack.kind != "none" else 0
    if attack.kind in CRAFTED_FROM_COLLUDERS and colluders > 1:
        if flower.node_data:
            raise ConfigError(
                f"attack {attack.kind} crafts each update from every colluder's honest update, and with flower.node_data a "
                "ClientApp holds only its own client's data",
                "drop flower.node_data (each ClientApp then rebuilds its colluders' updates) or use sign-flip or gaussian",
            )
        if spec.capabilities.client_state:
            raise ConfigError(
                f"attack {attack.kind} crafts each update from every colluder's honest update, and algorithm '{spec.name}' keeps "
                "each client's private state on that client's own node, out of the attacker's ClientApp",
                "use engine: local for this attack, or sign-flip or gaussian",
            )
    if attack.reconstruction.enabled and flower_secagg:
        raise ConfigError(
            "attack.reconstruction on Flower attacks individual updates, and under flower.secagg the ServerApp sees only their mean",
            "switch off flower.secagg, or run the attack on the sum with privacy.secagg on engine: local",
        )
    if flower.node_data:
        needs_data = {
            "robust.rule fltrust": robust.rule == "fltrust",  # root data drawn from the clients' training pool
            "attack.reconstruction": attack.reconstruction.enabled,  # scored against the victim's training text
            "attack.membership": attack.membership.enabled,  # members are clients' training examples
        }
        for what, asked in needs_data.items():
            if asked:
                raise ConfigError(
                    f"{what} needs the clients' data on the server, and with flower.node_data it stays on the nodes",
                    "drop flower.node_data (the server then partitions data.source itself) or this setting",
                )
        targeted = attack.kind == "backdoor" or (attack.kind == "label-flip" and attack.label_flip.source is not None)
        if targeted and not config.data.test_source:
            raise ConfigError(
                f"attack {attack.kind}'s success rate is measured on the server's global test set, and with flower.node_data "
                "the server has one only from data.test_source",
                "set data.test_source",
            )


def _check_dp(config: Config, spec: AlgorithmSpec) -> None:
    dp, robust = config.privacy.dp, config.robust
    if not spec.capabilities.weighted_mean:
        raise ConfigError(
            f"privacy.dp adds noise calibrated to a mean of clipped updates, and algorithm '{spec.name}' neither aggregates by a "
            "weighted mean nor defines what is clipped",
            f"use one of: {_names_with_mean()}",
        )
    if dp.noise_multiplier is not None and dp.target_epsilon is not None:
        raise ConfigError("privacy.dp: set noise_multiplier or target_epsilon, not both")
    if dp.budget_epsilon is not None and dp.noise_multiplier == 0:
        raise ConfigError("privacy.dp.budget_epsilon needs noise: with noise_multiplier 0 no round has a finite epsilon")
    if dp.target_epsilon is None:
        check_adaptive_noise(config, 1.0 if dp.noise_multiplier is None else dp.noise_multiplier)
    if dp.mode == "adaptive" and config.privacy.secagg.enabled:
        raise ConfigError(
            "adaptive clipping reads how many updates were clipped, which secure aggregation hides (it would need its own secure sum)",
            "use privacy.dp.mode: fixed with privacy.secagg",
        )
    if robust.rule != "none":
        raise ConfigError(
            f"privacy.dp's noise is calibrated to a mean of clipped updates; robust.rule {robust.rule} changes what one client can move",
            "choose DP or a robust rule (DP's clipping already bounds every update's norm)",
        )


def check_adaptive_noise(config: Config, noise_multiplier: float) -> None:
    """Adaptive clipping splits the round's privacy between the update sum and the clipped count
    (Andrew et al., Thm. 1): the count's noise must exceed half the noise multiplier."""
    dp = config.privacy.dp
    if dp.mode != "adaptive" or noise_multiplier <= 0:
        return
    count = dp.count_noise_stddev if dp.count_noise_stddev is not None else sampled_clients(config) / 20.0
    if 2.0 * count <= noise_multiplier:
        raise ConfigError(
            f"privacy.dp adaptive clipping: the clipped count's noise {count:g} must exceed half the noise multiplier "
            f"{noise_multiplier:g} (its privacy is shared with the update sum)",
            f"set privacy.dp.count_noise_stddev above {noise_multiplier / 2:g} (default: sampled clients / 20), or lower the noise",
        )


def _check_secagg(config: Config, spec: AlgorithmSpec) -> None:
    secagg, robust = config.privacy.secagg, config.robust
    if not spec.capabilities.weighted_mean:
        raise ConfigError(
            f"algorithm '{spec.name}' cannot run under secure aggregation: the server learns only the weighted mean of the uploads, "
            "and this algorithm's aggregation needs the individual updates",
            f"use one of: {_names_with_mean()}; or switch privacy.secagg off",
        )
    if robust.rule not in ("none", "norm-bounding"):
        raise ConfigError(
            f"robust.rule {robust.rule} needs the individual updates, and under secure aggregation the server sees only their sum",
            "use robust.rule: norm-bounding (each client bounds its own update before masking) or switch privacy.secagg off",
        )
    sampled = sampled_clients(config)
    if sampled < 2:
        raise ConfigError(
            f"secure aggregation needs at least 2 clients per round, this config samples {sampled}",
            "raise federation.sample_rate or clients",
        )
    threshold = secagg.threshold
    if isinstance(threshold, float) and threshold > 1:
        raise ConfigError("privacy.secagg.threshold as a fraction must be in (0, 1]; a count must be an integer")
    if secagg_threshold(config) > sampled:
        raise ConfigError(
            f"privacy.secagg.threshold {threshold} exceeds the {sampled} clients of a round", "lower it or sample more clients"
        )
    if config.engine != "flower" and sampled > (2 ** (secagg.modulus_bits - 1) - 1) // secagg.levels:
        raise ConfigError(
            f"{sampled} clients overflow a {secagg.modulus_bits}-bit ring at {secagg.levels} quantization levels",
            "lower privacy.secagg.levels or raise privacy.secagg.modulus_bits",
        )


def _check_robust(config: Config, spec: AlgorithmSpec, ranks: set[int]) -> None:
    robust = config.robust
    if robust.rule in MEAN_RULES and not spec.capabilities.weighted_mean:
        raise ConfigError(
            f"robust.rule {robust.rule} replaces the mean of the updates with another vector, and algorithm '{spec.name}' does not "
            "aggregate by a weighted mean",
            f"use robust.rule krum, multi-krum, norm-bounding or flame, or one of: {_names_with_mean()}",
        )
    if len(ranks) > 1:
        raise ConfigError(f"robust.rule {robust.rule} compares updates of one shape; clients have LoRA ranks {sorted(ranks)}")
    sampled = sampled_clients(config)
    if robust.rule in ("krum", "multi-krum") and sampled <= 2 * robust.byzantine + 2:
        raise ConfigError(
            f"Krum needs more than 2f + 2 = {2 * robust.byzantine + 2} updates per round, this config samples {sampled}",
            "lower robust.byzantine or sample more clients",
        )
    if robust.rule == "multi-krum" and robust.keep is not None and robust.keep > sampled:
        raise ConfigError(f"robust.keep {robust.keep} exceeds the {sampled} clients of a round")


def _check_attack(config: Config) -> None:
    attack, clients = config.attack, config.federation.clients
    chosen = attackers(config)
    if attack.kind != "none" and not chosen:
        raise ConfigError(f"attack.kind is {attack.kind} but no client attacks", "set attack.clients or attack.fraction")
    if attack.kind in COLLUDING_ATTACKS and len(chosen) < 2:
        raise ConfigError(
            f"attack {attack.kind} estimates the honest updates' spread from its colluders' own updates: it needs at least 2 attackers",
            "add attackers (attack.clients or attack.fraction)",
        )
    overlap = sorted(set(chosen) & {int(c) for c in config.federation.behaviours})
    if overlap:
        raise ConfigError(f"clients {overlap} are attackers and also have a federation.behaviours entry", "give each client one behaviour")
    for name in ("reconstruction", "membership"):
        settings = getattr(attack, name)
        if settings.enabled and not 0 <= settings.victim < clients:
            raise ConfigError(f"attack.{name}.victim {settings.victim} is not a client (clients are 0..{clients - 1})")


def effective_settings(config: Config) -> Config:
    """The run's effective config: ``privacy.dp``'s noise multiplier resolved (1.0 by default, or
    solved from ``target_epsilon``). The argument is not changed; it is returned as it is when
    nothing needs resolving."""
    dp = config.privacy.dp
    if not (dp.enabled and dp.noise_multiplier is None):
        return config
    effective = config.model_copy(deep=True)
    effective.privacy.dp.noise_multiplier = 1.0 if dp.target_epsilon is None else solve_noise_multiplier(config)
    check_adaptive_noise(config, effective.privacy.dp.noise_multiplier)
    return effective


def solve_noise_multiplier(config: Config) -> float:
    """The smallest z whose ε after ``federation.rounds`` rounds at the sampling rate stays within
    ``privacy.dp.target_epsilon`` (opacus; imports torch)."""
    from atoll.privacy.dp.accounting import noise_multiplier_for
    from atoll.privacy.errors import PrivacyBudgetError

    dp = config.privacy.dp
    rate = sampled_clients(config) / config.federation.clients
    try:
        return float(noise_multiplier_for(dp.target_epsilon, dp.delta, rate, config.federation.rounds, dp.accountant))
    except PrivacyBudgetError as error:
        raise ConfigError(f"privacy.dp.target_epsilon: {error.message}", error.fix) from None
