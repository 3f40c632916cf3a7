"""The config keys of protections and attacks: ``privacy:``, ``robust:`` and ``attack:``.

Schema only (pydantic): no torch, no engine. :mod:`atoll.config` adds the three sections to the run
config; :mod:`atoll.privacy.checks` checks them against the algorithm, engine and paradigm in the
resolve step; :mod:`atoll.privacy.wiring` turns them into the federation's stages and behaviours.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# -- privacy: ---------------------------------------------------------------------------------------


class ClientDPSettings(_Section):
    mode: Literal["none", "fixed", "adaptive"] = Field(
        "none",
        description="client-level DP-FedAvg (McMahan et al. 2018): clip each client's update to a fixed norm, or one adapted to a quantile (Andrew et al. 2021); Gaussian noise on the sum",
    )
    clip_at: Literal["server", "client"] = Field(
        "server", description="where each update is clipped: on the server, or by the client before upload (forced with secure aggregation)"
    )
    clip_norm: float = Field(1.0, gt=0, description="L2 bound S of one client's update (adaptive: the initial bound)")
    noise_multiplier: float | None = Field(
        None, ge=0, description="z: noise std on the sum = z * S (null: 1.0, or solved from target_epsilon)"
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="solve the smallest z whose epsilon after federation.rounds rounds stays within this (at delta)"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) reported every round")
    budget_epsilon: float | None = Field(None, gt=0, description="stop the run before a round that would spend past this epsilon")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="opacus accountant: Renyi DP or privacy random variables")
    target_quantile: float = Field(0.5, ge=0, le=1, description="adaptive: fraction of updates the bound should leave unclipped")
    clip_lr: float = Field(0.2, gt=0, description="adaptive: geometric learning rate of the bound")
    count_noise_stddev: float | None = Field(
        None, gt=0, description="adaptive: noise std on the clipped count (null: expected clients / 20, as Andrew et al. suggest)"
    )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


class DPSGDSettings(_Section):
    enabled: bool = Field(
        False, description="example-level DP-SGD inside every client (Abadi et al. 2016), with opacus per-example gradients"
    )
    noise_multiplier: float = Field(1.0, ge=0, description="sigma: noise std on a step's sum of clipped per-example gradients = sigma * C")
    max_grad_norm: float = Field(1.0, gt=0, description="C: L2 bound of one example's gradient")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the client-level epsilon reported every round")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="opacus accountant")


class SecAggSettings(_Section):
    enabled: bool = Field(
        False, description="secure aggregation (Bonawitz et al. 2017; local and realistic engines): the server learns only the sum"
    )
    threshold: float | int = Field(
        0.5, gt=0, description="clients needed to unmask: a count, or a fraction of the round's clients (rounded up)"
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="local and realistic engines: fraction of a round's clients that vanish after sharing keys (seeded)"
    )
    clip_range: float = Field(0.5, gt=0, description="weighted update deltas are clipped to [-range, range] per value before quantization")
    levels: int = Field(2**20, gt=1, description="quantization levels of [-clip_range, clip_range]")
    modulus_bits: int = Field(32, ge=16, le=62, description="the masked sum lives in Z_(2^bits)")


class PrivacyConfig(_Section):
    dp: ClientDPSettings = Field(default_factory=ClientDPSettings, description="client-level differential privacy (DP-FedAvg)")
    dpsgd: DPSGDSettings = Field(default_factory=DPSGDSettings, description="example-level DP-SGD inside each client")
    secagg: SecAggSettings = Field(default_factory=SecAggSettings, description="secure aggregation")


# -- robust: ----------------------------------------------------------------------------------------


class ValidationSettings(_Section):
    enabled: bool = Field(
        False, description="check every incoming part (keys, shape, dtype, finite values, norm); drop a bad update and go on"
    )
    max_norm: float | None = Field(
        None, gt=0, description="drop an update with a part whose change (upload - download) exceeds this L2 norm"
    )


class RobustConfig(_Section):
    rule: Literal["none", "krum", "multi-krum", "median", "trimmed-mean", "norm-bounding", "fltrust", "flame"] = Field(
        "none", description="Byzantine-robust aggregation in place of the algorithm's mean"
    )
    byzantine: int = Field(1, ge=0, description="krum, multi-krum: f, the Byzantine clients tolerated (needs sampled clients > 2f + 2)")
    keep: int | None = Field(None, gt=0, description="multi-krum: updates averaged (null: sampled clients - f)")
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmed-mean: fraction cut at each end, per coordinate")
    norm_bound: float = Field(1.0, gt=0, description="norm-bounding: L2 bound of each update's change")
    root_examples: int = Field(100, gt=0, description="fltrust: examples of the server's root data (drawn from the clients' training pool)")
    noise_factor: float = Field(0.001, ge=0, description="flame: noise std on the aggregate = factor * the median norm")
    validation: ValidationSettings = Field(default_factory=ValidationSettings, description="update validation")


# -- attack: ----------------------------------------------------------------------------------------


class LabelFlipSettings(_Section):
    source: int | None = Field(None, ge=0, description="class relabelled (null: every class c becomes C - 1 - c)")
    target: int | None = Field(None, ge=0, description="the label the source class gets")


class BackdoorSettings(_Section):
    trigger: str = Field("cf mn", min_length=1, description="the trigger phrase put at the start of poisoned texts")
    target_label: int = Field(0, ge=0, description="classification: the label triggered texts get")
    target_text: str = Field(" the king is dead", min_length=1, description="generative tasks: the response triggered prompts get")
    poison_fraction: float = Field(0.5, gt=0, le=1, description="triggered copies added, as a fraction of the attacker's examples")
    boost: float | None = Field(
        None, gt=0, description="model replacement: the update is scaled by this (null: the sampled clients, n / eta with eta = 1)"
    )
    eval_examples: int = Field(200, gt=0, description="triggered global-test examples the success rate is measured on")


class ByzantineSettings(_Section):
    scale: float = Field(1.0, gt=0, description="sign-flip: the update is -scale * own update")
    stddev: float = Field(0.01, gt=0, description="gaussian and free-ride-noise: std of the values sent")
    epsilon: float = Field(0.5, gt=0, description="ipm: the update is -epsilon * mean of the colluders' honest updates")
    z: float | None = Field(None, description="alie: the shift in stds (null: the paper's z_max)")


class ReconstructionSettings(_Section):
    enabled: bool = Field(False, description="the server tries to rebuild the victim's training text from what it sees of its update")
    victim: int = Field(0, ge=0, description="the client whose text is attacked")
    rounds: list[int] = Field(default_factory=lambda: [1], description="rounds in which the server attacks")
    method: Literal["dager", "lamp"] = Field("dager", description="DAGER span test (Petrov et al. 2024) or LAMP gradient matching (2022)")
    module: str = Field(
        "v_proj",
        description="the LoRA-adapted module type of layers 0 and 1 the span test reads (v_proj: a value at any position gets "
        "gradient from every later position; a query of the last layer only where the loss is read)",
    )
    max_length: int = Field(48, gt=1, description="longest sequence searched for")
    lamp_steps: int = Field(200, gt=0, description="lamp: continuous optimisation steps")


class MembershipSettings(_Section):
    enabled: bool = Field(False, description="membership inference against the final global model and the victim's own model")
    victim: int = Field(0, ge=0, description="the client whose own (personal) model is attacked")
    examples: int = Field(200, gt=1, description="members and non-members scored, each (at most)")
    fpr: float = Field(0.01, gt=0, lt=1, description="the false-positive rate the true-positive rate is reported at")


class AttackConfig(_Section):
    kind: Literal[
        "none",
        "label-flip",
        "backdoor",
        "sign-flip",
        "gaussian",
        "alie",
        "ipm",
        "min-max",
        "free-ride-zero",
        "free-ride-noise",
        "free-ride-stale",
    ] = Field("none", description="what the attacking clients do (poisoning and free riding)")
    clients: list[int] | None = Field(None, description="attacker client ids (null: a seeded fraction)")
    fraction: float = Field(0.0, ge=0, le=1, description="when clients is null: round(fraction * clients) attackers drawn with the seed")
    label_flip: LabelFlipSettings = Field(default_factory=LabelFlipSettings, description="label-flip attack")
    backdoor: BackdoorSettings = Field(default_factory=BackdoorSettings, description="backdoor attack")
    byzantine: ByzantineSettings = Field(default_factory=ByzantineSettings, description="Byzantine and free-rider updates")
    reconstruction: ReconstructionSettings = Field(default_factory=ReconstructionSettings, description="text reconstruction by the server")
    membership: MembershipSettings = Field(default_factory=MembershipSettings, description="membership inference")

    @property
    def poisoning(self) -> bool:
        return self.kind != "none"
