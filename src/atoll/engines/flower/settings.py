"""The ``flower:`` section of a run config (used when ``engine: flower``).

Imported by :mod:`atoll.config`: only pydantic here. Combinations that need the algorithm or the
rest of the config to judge (SecAgg+ with a non-mean aggregator, DP with SecAgg+, insecure
connections off loopback) are refused in :mod:`atoll.engines.flower.checks`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SecAggSettings(_Section):
    enabled: bool = Field(False, description="sum client uploads with Flower's SecAgg+ (server sees only the weighted mean)")
    num_shares: int | float = Field(
        3, gt=0, description="SecAgg+ neighbours per client (int > 2), or a fraction of the sampled clients (1.0 = plain SecAgg)"
    )
    reconstruction_threshold: int | float = Field(
        2, gt=0, description="shares needed to unmask a client (int < num_shares), or a fraction of num_shares"
    )
    clipping_range: float = Field(8.0, gt=0, description="upload values are clipped to [-range, range] before quantization")
    quantization_range: int = Field(4194304, gt=1, description="quantization levels of [-clipping_range, clipping_range] (default 2**22)")


class DPSettings(_Section):
    mode: Literal["none", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive"] = Field(
        "none",
        description="central DP with Flower's wrappers: where updates are clipped (server or client) and how (fixed or adaptive norm)",
    )
    noise_multiplier: float = Field(
        1.0, ge=0, description="Gaussian noise std on the aggregate = noise_multiplier * clipping norm / sampled clients"
    )
    clipping_norm: float = Field(1.0, gt=0, description="L2 norm bound of one client's update (adaptive modes: the initial bound)")
    weighting: Literal["equal", "examples"] = Field(
        "equal",
        description="how clipped updates are averaged: equal (1/m each, the sensitivity C/m the noise is calibrated to) or examples (sensitivity C*max p_k, above what the noise assumes)",
    )
    target_clipped_quantile: float = Field(
        0.5, ge=0, le=1, description="adaptive modes: fraction of updates the norm bound should leave unclipped"
    )
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive modes: learning rate of the norm bound")


class FlowerConfig(_Section):
    mode: Literal["simulation", "deployment"] = Field(
        "simulation",
        description="simulation: Flower's simulation engine (Ray) on this machine; deployment: a running SuperLink with SuperNodes",
    )
    actors: int | None = Field(
        None, gt=0, description="simulation: ClientApps trained in parallel (Ray actors, one CPU each; null: min(clients, CPU cores))"
    )
    superlink: str | None = Field(
        None, description="deployment: host:port of the SuperLink (Flower 1.41 serves all its APIs on this one port), e.g. 127.0.0.1:9093"
    )
    root_certificates: str | None = Field(None, description="deployment: CA certificate (PEM) that signed the SuperLink's TLS certificate")
    insecure: bool = Field(False, description="deployment: plain HTTP without TLS (refused unless the SuperLink is on loopback)")
    min_available_clients: int | None = Field(
        None,
        gt=0,
        description="wait for this many online clients before a round, and fail a round that gets fewer replies (null: all clients)",
    )
    wait_timeout: float = Field(300.0, gt=0, description="seconds to wait for min_available_clients before the run fails")
    round_timeout: float = Field(
        600.0, gt=0, description="seconds to wait for a round's replies; clients that have not answered by then count as dropped"
    )
    secagg: SecAggSettings = Field(default_factory=SecAggSettings, description="secure aggregation (SecAgg+)")
    dp: DPSettings = Field(default_factory=DPSettings, description="central differential privacy (Flower's DP wrappers and clipping mods)")
