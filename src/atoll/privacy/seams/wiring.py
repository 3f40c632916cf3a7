"""From ``privacy:``, ``robust:`` and ``attack:`` to the federation's stages and client behaviours.

:func:`protection_stages` is what :class:`~atoll.fl.federation.Federation` calls when it is built,
in every driver (the synchronous loop and the event simulation), so client-side and server-side steps come from one config:

=====================  ==========================================  ============================
config                 stage or behaviour                          acts at
=====================  ==========================================  ============================
robust.validation      UpdateValidation (replaces the finiteness   on_receive
                       check: drops instead of stopping)
privacy.dpsgd          ExampleLevelDP                              training_hooks, before_upload
privacy.dp,            ProtectedAggregation                        before_upload (client clip),
privacy.secagg,                                                    aggregate, round_metrics,
robust.rule                                                        stop_reason, upload_cost
attack.kind            AttackingClient for the attackers           the client's training
                       AttackSuccess (backdoor, targeted flip)     round_metrics
attack.reconstruction  ReconstructionObserver                      on_receive, or the secure sum
attack.membership      MembershipObserver                          round_metrics (final round)
=====================  ==========================================  ============================

On Flower the ServerApp and every ClientApp build their own federation from the same resolved run:
``side`` "server" builds what acts on the server (receive, aggregate, records, stop) and "client"
what acts on a client's device (training hooks, before upload, behaviours); the local and
realistic engines build both in one process ("both"). The pieces are the same objects either way;
what Flower cannot do is refused by :func:`atoll.privacy.checks.check_on_flower`. There the
membership attack on the victim's own model needs the victim's personal state, which stays on its
node: for personalized algorithms only the global model is attacked.
"""

from __future__ import annotations

import numpy as np

from atoll.errors import ConfigError
from atoll.fl.base import local_steps
from atoll.fl.stages import FiniteUpdates, Stages
from atoll.fl.trainer import TrainPlan
from atoll.privacy.checks import attackers, sampled_clients, secagg_threshold
from atoll.privacy.messages import flat_delta
from atoll.privacy.seams.aggregation import ProtectedAggregation
from atoll.privacy.seams.behaviours import AttackingClient, Coalition
from atoll.privacy.seams.central_dp import ClientLevelDP
from atoll.privacy.seams.example_dp import ExampleLevelDP
from atoll.privacy.seams.membership_observer import MembershipObserver
from atoll.privacy.seams.monitors import AttackSuccess
from atoll.privacy.seams.reconstruction_observer import ReconstructionObserver
from atoll.privacy.seams.secure_round import SecureRound
from atoll.privacy.seams.validation_stage import UpdateValidation
from atoll.seeding import numpy_rng


SIDES = ("both", "server", "client")


def protection_stages(experiment, base: Stages, side: str = "both") -> Stages:
    """``base`` (the default stages and ``federation.behaviours``) with the protections and attacks
    of the config added, for the server, the clients or ``both`` (see the module docstring)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    config = experiment.config
    privacy, robust, attack = config.privacy, config.robust, config.attack
    check_task(experiment)
    server = experiment.server
    serving, training = side in ("both", "server"), side in ("both", "client")
    stages = list(base.stages)
    behaviours = dict(base.behaviours)
    if robust.validation.enabled and serving:
        stages = [UpdateValidation(server, robust.validation.max_norm) if isinstance(s, FiniteUpdates) else s for s in stages]
    if privacy.dpsgd.enabled:
        sizes = experiment.server.context.client_sizes  # a node-data run's server fills them in as the nodes report
        stages.append(ExampleLevelDP(experiment.workbench, privacy.dpsgd, config, lambda: list(sizes), config.seed))
    sampled = sampled_clients(config)
    dp = ClientLevelDP(privacy.dp, sampled, config.federation.clients) if privacy.dp.enabled else None
    secure = SecureRound(privacy.secagg, lambda n: secagg_threshold(config, n), config.seed) if privacy.secagg.enabled else None
    rule = robust if robust.rule != "none" else None
    chosen = attackers(config)
    aggregation = None
    if dp is not None or secure is not None or rule is not None:
        aggregation = ProtectedAggregation(
            server,
            config.seed,
            sampled,
            max(experiment.splits.client_sizes()),
            dp,
            secure,
            rule,
            frozenset(chosen),
            root_change_of(experiment) if robust.rule == "fltrust" and serving else None,
        )
        stages.append(aggregation)
    if attack.kind != "none":
        if training:
            coalition = Coalition(experiment, attack, chosen, sampled)
            behaviours.update({client_id: AttackingClient(coalition) for client_id in chosen})
        if serving and (attack.kind == "backdoor" or (attack.kind == "label-flip" and attack.label_flip.source is not None)):
            stages.append(AttackSuccess(experiment, attack))
    if not serving:
        return Stages(stages, behaviours)
    if attack.reconstruction.enabled:
        observer = ReconstructionObserver(experiment, attack.reconstruction, sees_individual_updates=not privacy.secagg.enabled)
        stages.append(observer)
        if aggregation is not None:
            aggregation.listeners.append(observer.on_release)
    if attack.membership.enabled:
        stages.append(MembershipObserver(experiment, attack.membership, personal_state_here=config.engine != "flower"))
    return Stages(stages, behaviours)


def check_task(experiment) -> None:
    """What the task decides (known once the data is loaded): one line each."""
    attack, spec = experiment.config.attack, experiment.spec
    if attack.kind == "label-flip":
        if spec.kind != "classification":
            raise ConfigError(f"attack.kind label-flip needs a classification task, this one is {spec.kind}", "use attack.kind backdoor")
        for name in ("source", "target"):
            value = getattr(attack.label_flip, name)
            if value is not None and value >= spec.num_labels:
                raise ConfigError(f"attack.label_flip.{name} {value} is not a class (classes are 0..{spec.num_labels - 1})")
        if (attack.label_flip.source is None) != (attack.label_flip.target is None):
            raise ConfigError("attack.label_flip: set both source and target, or neither (every class flipped)")
    if attack.kind == "backdoor" and not spec.is_generative and attack.backdoor.target_label >= spec.num_labels:
        raise ConfigError(f"attack.backdoor.target_label {attack.backdoor.target_label} is not a class (0..{spec.num_labels - 1})")
    if attack.reconstruction.enabled and not spec.is_generative:
        raise ConfigError("attack.reconstruction rebuilds a causal language model's text; this task is classification")


def root_change_of(experiment):
    """FLTrust's server update Δ_0: the download trained on the server's root examples (a seeded
    sample of the clients' training pool, which the server holds as clean data of the same kind)."""
    config = experiment.config
    settings = config.robust
    pooled = np.concatenate([experiment.splits.client_train[c] for c in experiment.real_client_ids])
    root = np.sort(numpy_rng(config.seed, "fltrust-root").choice(pooled, size=min(len(pooled), settings.root_examples), replace=False))
    train = config.train

    def root_change(round: int, download):
        workbench = experiment.workbench
        plan = TrainPlan(
            steps=local_steps(train, len(root)),
            lr=train.lr * train.round_decay ** (round - 1),
            grad_accum=train.grad_accum,
            weight_decay=train.weight_decay,
            schedule=train.schedule,
            warmup_steps=train.warmup_steps,
            max_grad_norm=train.max_grad_norm,
            optimizer=train.optimizer,
        )
        hooks, workbench.stage_hooks = workbench.stage_hooks, []
        try:
            workbench.load(download)
            workbench.train(root, plan, train.batch_size, rng_keys=("fltrust-root", round), group_by_length=train.group_by_length)
            return flat_delta(workbench.read(), download, -1)[0]
        finally:
            workbench.stage_hooks = hooks

    return root_change
