"""The stage that protects a round's aggregation: client-level DP, secure aggregation, robust rules.

One stage, because all three decide what the algorithm's aggregation receives, and they compose in
one order: clients clip (DP with ``clip_at: client`` or under secure aggregation; norm bounding
under secure aggregation), the server obtains the sum (in the clear, or through Bonawitz et al.'s
protocol), a robust rule filters or replaces the mean, DP adds its noise to the sum and divides by
the expected clients, and the algorithm aggregates the result: the surviving updates, or one
update holding the protected mean (exact for algorithms with the ``weighted_mean`` capability,
which is why the resolve step requires it there).

Threat model of the client-side steps: a client controls its own device, so an attacker
(``attack.clients``) skips them. Server-side clipping binds everyone; client-side clipping under
secure aggregation binds only honest clients (a malicious client's update enters the sum as it
is, up to the quantizer's range), as without zero-knowledge norm proofs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch import Tensor

from atoll.errors import UpdateError
from atoll.fl.stages import Stage
from atoll.fl.state import AdapterState, Update
from atoll.privacy.dp.clipping import l2_norm
from atoll.privacy.errors import SecureAggregationError
from atoll.privacy.messages import (
    PROTECTED_MEAN,
    applied,
    flat_delta,
    refuse_control,
    start_of,
    replace_model_tensors,
    unflat,
)
from atoll.privacy.seams.central_dp import ClientLevelDP
from atoll.privacy.seams.robust_rules import apply_rule
from atoll.privacy.seams.secure_round import SecureRound
from atoll.privacy.vectors import Layout
from atoll.seeding import torch_generator

log = logging.getLogger("atoll.privacy")


@dataclasses.dataclass
class Release:
    """What the server learned of a round's changes when it could not see them one by one."""

    round: int
    change: dict[str, Tensor]  # the mean change it learned
    download: AdapterState
    clients: list[int]  # whose changes are in it


class ProtectedAggregation(Stage):
    """See the module docstring."""

    name = "protected-aggregation"

    def __init__(
        self,
        server,
        seed: int,
        expected_clients: int,
        max_examples: int,
        dp: ClientLevelDP | None = None,
        secure: SecureRound | None = None,
        robust=None,
        attackers: frozenset[int] = frozenset(),
        root_change: Callable[[int, AdapterState], Tensor] | None = None,
    ):
        self.server = server
        self.seed = seed
        self.expected_clients = expected_clients
        self.max_examples = max(1, max_examples)
        self.dp = dp
        self.secure = secure
        self.robust = robust
        self.attackers = attackers
        self.root_change = root_change
        self.listeners: list[Callable[[Release], None]] = []
        self.metrics: dict[str, float] = {}
        under_secure = secure is not None
        self.client_bound: Callable[[Tensor], Tensor] | None = None
        if dp is not None and (under_secure or dp.settings.clip_at == "client"):
            self.client_bound = dp.clip
        elif robust is not None and robust.rule == "norm-bounding" and under_secure:
            bound = robust.norm_bound
            from atoll.privacy.dp.clipping import clip_to_norm

            self.client_bound = lambda vector: clip_to_norm(vector, bound)

    # -- client side ----------------------------------------------------------------------------------
    def before_upload(self, round: int, client_id: int, update: Update, download: AdapterState) -> Update:
        if self.client_bound is None or client_id in self.attackers:  # an attacker skips what runs on its own device
            return update
        change, layout = flat_delta(update.state, download, client_id)
        update.state = applied(update.state, download, unflat(self.client_bound(change), layout))
        if self.dp is not None:
            update.num_examples = 1  # DP-FedAvg weighs every client the same
        return update

    # -- server side ----------------------------------------------------------------------------------
    def aggregate(self, round: int, updates: list[Update], server) -> bool:
        self.metrics = {}
        if not updates or (self.dp is None and self.secure is None and self.robust is None):
            return False
        context = self.server.context
        downloads = {u.client_id: start_of(context, u.client_id, self.server.configure(round, u.client_id)) for u in updates}
        if self.secure is not None:
            return self._secure(round, updates, downloads, server)
        if self.robust is not None:
            return self._robust(round, updates, downloads, server)
        return self._central_dp(round, updates, downloads, server)

    def _central_dp(self, round: int, updates: list[Update], downloads: dict, server) -> bool:
        refuse_control(updates, "DP-FedAvg's noisy mean")
        reference = uniform_download(downloads, "DP-FedAvg")
        rows, layout = changes_of(updates, downloads)
        generator = torch_generator(self.seed, "dp-noise", round)
        norms = [l2_norm(row) for row in rows]
        mean = self.dp.noisy_mean(self.dp.clip_and_sum(rows), generator)
        self.dp.move_bound(norms, generator)
        self.dp.account()
        state = applied(updates[0].state, reference, unflat(mean, layout))
        server.aggregate(round, [Update(PROTECTED_MEAN, sum(u.num_examples for u in updates), state, {})])
        return True

    def _secure(self, round: int, updates: list[Update], downloads: dict, server) -> bool:
        refuse_control(updates, "secure aggregation")
        reference = uniform_download(downloads, "secure aggregation of changes")
        rows, layout = changes_of(updates, downloads)
        inputs = {}
        for update, row in zip(updates, rows):
            if self.dp is not None:
                inputs[update.client_id] = row  # clipped by the client; every client weighs 1
            else:  # the weight travels as one more value, scaled into the quantizer's range
                weight = update.num_examples / self.max_examples
                scaled = weight * self.secure.settings.clip_range
                inputs[update.client_id] = torch.cat([row * weight, torch.tensor([scaled], dtype=torch.float64)])
        try:
            result = self.secure.run(round, inputs)
        except SecureAggregationError as error:
            log.warning("round %s: %s", round, error)
            self.metrics = {"secagg_failed": 1.0, "secagg_participants": float(len(inputs))}
            return True  # the round is dropped as a whole: nothing of it is released
        if self.dp is not None:
            mean = self.dp.noisy_mean(result.total, torch_generator(self.seed, "dp-noise", round))
            self.dp.account()
        else:
            mean = result.total[:-1] * self.secure.settings.clip_range / result.total[-1]
        change = unflat(mean, layout)
        self._publish(Release(round, change, reference, list(result.included)))
        examples = sum(u.num_examples for u in updates if u.client_id in set(result.included))
        server.aggregate(round, [Update(PROTECTED_MEAN, examples, applied(updates[0].state, reference, change), {})])
        self.metrics = {
            "secagg_failed": 0.0,
            "secagg_participants": float(len(inputs)),
            "secagg_dropped": float(len(result.dropped)),
            "secagg_bytes_up": float(result.bytes_up),
            "secagg_bytes_down": float(result.bytes_down),
            "secagg_clamped_values": float(result.clamped),
        }
        return True

    def _robust(self, round: int, updates: list[Update], downloads: dict, server) -> bool:
        settings = self.robust
        rows, layout = changes_of(updates, downloads)
        matrix = torch.stack(rows)
        root = None
        if settings.rule == "fltrust":
            root = self.root_change(round, uniform_download(downloads, "FLTrust"))
        outcome = apply_rule(settings, matrix, root)
        attackers_in = [i for i, u in enumerate(updates) if u.client_id in self.attackers]
        if outcome.mean is not None:
            refuse_control(updates, f"robust rule {settings.rule}")
            reference = uniform_download(downloads, f"robust rule {settings.rule}")
            state = applied(updates[0].state, reference, unflat(outcome.mean, layout))
            server.aggregate(round, [Update(PROTECTED_MEAN, sum(u.num_examples for u in updates), state, {})])
            kept = list(range(len(updates)))
        else:
            chosen = []
            for index in outcome.kept:
                update = updates[index]
                if index in outcome.changes:
                    state = applied(update.state, downloads[update.client_id], unflat(outcome.changes[index], layout))
                    update = dataclasses.replace(update, state=state)
                chosen.append(update)
            server.aggregate(round, chosen)
            if outcome.noise_stddev > 0:
                add_noise(server, layout, outcome.noise_stddev, torch_generator(self.seed, "flame-noise", round))
            kept = outcome.kept
        self.metrics = {}
        if outcome.mean is None:  # a selection: who made it into the aggregate
            self.metrics = {"robust_kept": float(len(kept)), "robust_attackers_kept": float(len(set(kept) & set(attackers_in)))}
        if outcome.trust:
            honest = [t for i, t in enumerate(outcome.trust) if i not in attackers_in]
            if honest:
                self.metrics["fltrust_honest_trust"] = float(sum(honest) / len(honest))
            if attackers_in:
                self.metrics["fltrust_attacker_trust"] = float(sum(outcome.trust[i] for i in attackers_in) / len(attackers_in))
        return True

    def _publish(self, release: Release) -> None:
        for listener in self.listeners:
            listener(release)

    # -- records, stopping, costs, checkpoints --------------------------------------------------------
    def round_metrics(self, round: int) -> dict[str, float]:
        metrics = dict(self.metrics)
        if self.dp is not None:
            metrics.update(self.dp.metrics())
        return metrics

    def stop_reason(self) -> str | None:
        return self.dp.stop_reason() if self.dp is not None else None

    def upload_cost(self, update: Update) -> tuple[int, int]:
        if self.secure is None:
            return 0, 0
        tensors = update.state.model_tensors().values()
        values = sum(t.numel() for t in tensors) + (0 if self.dp is not None else 1)
        # the masked vector replaces the model tensors' raw bytes; the message's framing stays
        return self.secure.client_cost(self.expected_clients, values, sum(t.numel() * t.element_size() for t in tensors))

    def state(self) -> dict:
        return {"dp": self.dp.state()} if self.dp is not None else {}

    def load_state(self, state: dict) -> None:
        if self.dp is not None and "dp" in state:
            self.dp.load_state(state["dp"])


def uniform_download(downloads: dict[int, AdapterState], what: str) -> AdapterState:
    """The one download every client of the round got (a change is measured from it)."""
    states = list(downloads.values())
    first = states[0].model_tensors()
    for client_id, state in downloads.items():
        tensors = state.model_tensors()
        if tensors.keys() != first.keys() or any(not torch.equal(tensors[k], first[k]) for k in first):
            raise UpdateError(
                f"{what} measures every change from one download, but client {client_id} downloaded a different adapter",
                "use an algorithm whose clients all download the global adapter",
            )
    return states[0]


def changes_of(updates: list[Update], downloads: dict[int, AdapterState]) -> tuple[list[Tensor], Layout]:
    """Each update's change as a flat vector; all in one layout (same parts and shapes)."""
    rows, layout = [], None
    for update in updates:
        row, mine = flat_delta(update.state, downloads[update.client_id], update.client_id)
        if layout is None:
            layout = mine
        elif mine != layout:
            raise UpdateError(f"client {update.client_id} uploaded other parts or shapes than client {updates[0].client_id}")
        rows.append(row)
    return rows, layout


def add_noise(server, layout: Layout, stddev: float, generator: torch.Generator) -> None:
    """N(0, stddev²) on the global adapter's tensors of ``layout`` (FLAME's noise on the aggregate)."""
    current = server.global_state.model_tensors()
    noisy = {}
    for key in layout.keys:
        if key in current:
            tensor = current[key].to(torch.float64)
            noisy[key] = tensor + torch.normal(0.0, stddev, tensor.shape, generator=generator, dtype=torch.float64)
    server.global_state = replace_model_tensors(server.global_state, noisy)
