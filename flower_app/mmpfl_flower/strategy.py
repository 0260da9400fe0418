"""The server side of MM-PFL-ADP (and its baselines) as a Flower strategy.

:class:`KitStrategy` is a ``flwr.serverapp.strategy.Strategy`` whose every decision is the kit's
strategy hook (``mmpfl_core.federated``): who takes part (:func:`select_round`, stream (seed, 1, t),
Poisson sampling for DP), what the sites are told (``round_instructions``: the round's whole
:class:`~mmpfl_core.privacy.release.RoundRelease` record, clip bounds, the noise gate's drowned groups
and Fisher noise scales from PUBLIC data, sent with every train message), how the replies are aggregated (``aggregate``: per-group clipped
sum + Gaussian noise / qN, masked groups as zeros) and what is accounted (the strategy's
``PrivacyLedger``). Flower's own DP wrappers are not used: they noise all arrays uniformly and their
accountant knows neither sampling amplification nor masked groups (docs/FACTS.md, "Flower 1.42").

Fault handling and privacy accounting (the assumption, stated once):
  * A site that fails, times out, or sends a malformed reply (NaN/Inf, unknown or wrong-shaped
    arrays, non-positive or non-integer example count, a site id it was not asked for) is a
    DROPOUT: its reply is not aggregated and the round goes on.
  * ``server`` placement: the noise is added by the server to the sum of whoever arrived and the
    sum is divided by the EXPECTED number of participants qN, never the realised one, so the
    sensitivity of the release is C whoever dropped; the round is charged at rate q as in the
    in-process engine. This holds if dropping out does not depend on the site's data (a crash, a
    network failure); a site that drops *because of* its data changes its own inclusion
    probability, which the Poisson-sampling analysis does not cover.
  * ``distributed`` placement: the server announces the number m of selected, connected sites and
    each adds sigma_g^2 / m, so the sum carries exactly sigma_g^2 whoever took part. SecAgg+ runs
    with reconstruction threshold m (every announced share must arrive to unmask) when m >= 2; with
    m = 1 the single noised update is sent as a plain message (it IS the sum the server would see);
    with m = 0, or when the secure sum fails, the server adds the missing noise itself
    (``release_sum`` tops up sigma_g^2 (m - s) / m). No round is aborted, as in-process: there is no
    participant-count threshold whose outcome would depend on the sample. Caveat: a dropout during
    SecAgg+ discards the other participants' updates too; if dropouts depend on anything private
    this is outside the analysis.
  * ``min-nodes`` SuperNodes must be connected before round 1; a round with no reply at all still
    releases (server noise only) exactly as the in-process engine does for an empty Poisson round.

Evaluation: every site scores the global model and its personal model on its own val/test splits
and returns correct counts; the server pools them (pooled accuracy = the in-process engine's, as
the splits are the same). These counts are releases outside the DP guarantee (docs/DESIGN.md 4.6).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from mmpfl_core.federated.client import ClientUpdate
from mmpfl_core.federated.simulation import select_round
from mmpfl_core.federated.strategies import State, Strategy
from mmpfl_core.metrics.communication import CommunicationCounter

from .task import Job, MalformedReply, federation_of, numpy_to_state, state_to_numpy, validate_reply

logger = logging.getLogger(__name__)


def to_array_record(state: State) -> ArrayRecord:
    from flwr.app import Array
    return ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in state_to_numpy(state).items()})


class KitStrategy(FlowerStrategy):
    """A Flower strategy that delegates to a configured kit strategy (module docstring)."""

    def __init__(self, job: Job, core: Strategy, global_state: State, node_sites: dict[int, int]) -> None:
        self.job, self.core, self.global_state = job, core, global_state
        self.node_sites = dict(node_sites)  # node id -> site id
        self.site_nodes = {s: n for n, s in self.node_sites.items()}
        self.all_sites = sorted(s.site_id for s in federation_of(job).sites)
        self.shapes = {n: tuple(t.shape) for n, t in global_state.items()}
        self.counter = CommunicationCounter()
        self.selected: list[int] = []
        self.round_stats: dict[str, float] = {}
        #: each site's sample-level epsilon from its OWN DP-SGD ledger (reported by the site; the server
        #: keeps no per-patient ledger of its own in this engine)
        self.site_epsilons: dict[int, float] = {}
        #: the largest union bound on a SecAgg+ refusal seen over the run (0 without SecAgg+)
        self.secagg_refusal_bound = 0.0

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Select sites as the in-process loop does (secretly, for a private strategy); one message per
        selected, connected site, whose number m is announced (distributed noise shares sigma^2/m)."""
        cfg = self.job.experiment.federated
        self.selected = select_round(self.core, sorted(self.site_nodes), cfg, server_round)
        reachable = self.reachable(server_round, grid)
        if hasattr(self.core, "announce_participants"):
            self.core.announce_participants(len(reachable))
        instructions = self.core.round_instructions(server_round, self.global_state)
        return self.train_messages(server_round, reachable, arrays, config, instructions)

    def reachable(self, server_round: int, grid: Grid) -> list[int]:
        """The selected sites whose SuperNode is connected (the others are dropouts, logged)."""
        online = set(grid.get_node_ids())
        out = []
        for site in self.selected:
            node = self.site_nodes.get(site)
            if node is None or node not in online:
                logger.warning("round %d: site %d has no connected SuperNode; counted as a dropout", server_round, site)
                continue
            out.append(site)
        return out

    def train_messages(self, server_round: int, sites: list[int], arrays: ArrayRecord, config: ConfigRecord,
                       instructions: dict[str, Any]) -> list[Message]:
        """One train message per site in ``sites`` (already selected, connected and announced); its config is
        the transport keys (method, site) plus the round's release record, whole."""
        if instructions.get("round", server_round) != server_round:
            raise ValueError(f"round {server_round}: the release record is for round {instructions['round']}.")
        messages = []
        for site in sites:
            self.counter.add_download(server_round, site, self.global_state)
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({**dict(config), "round": server_round,
                                                                             "site": site, **instructions})})
            messages.append(Message(content=content, dst_node_id=self.site_nodes[site], message_type="train",
                                    group_id=str(server_round)))
        return messages

    def _parse(self, server_round: int, replies: Iterable[Message]) -> list[tuple[ClientUpdate, State]]:
        """Validated replies sorted by site (the in-process summation order); the rest are dropouts."""
        good: dict[int, tuple[ClientUpdate, State]] = {}
        rejected = failed = 0
        expected = set(self.selected)
        for reply in replies:
            if reply.has_error():
                failed += 1
                logger.warning("round %d: node %s failed: %s", server_round, reply.metadata.src_node_id, reply.error)
                continue
            try:
                metrics = reply.content.metric_records["metrics"]
                arrays = {n: a.numpy() for n, a in reply.content.array_records["arrays"].items()}
                site = metrics.get("site")
                validate_reply(arrays, self.shapes, num_examples=metrics.get("num-examples"), site=site,
                               expected_sites=expected - set(good))
                if self.node_sites.get(reply.metadata.src_node_id) != int(site):
                    raise MalformedReply(f"node {reply.metadata.src_node_id} answered for site {site}.")
            except (KeyError, MalformedReply) as exc:
                rejected += 1
                logger.warning("round %d: rejected the reply of node %s: %s", server_round,
                               reply.metadata.src_node_id, exc)
                continue
            sent = numpy_to_state(arrays)
            update = ClientUpdate(site_id=int(site), delta={}, num_examples=int(metrics["num-examples"]),
                                  num_steps=int(metrics.get("num-steps", 0)), train_loss=float(metrics["train-loss"]))
            self.counter.add_upload(server_round, int(site), sent)
            good[int(site)] = (update, sent)
            self.note_site_epsilon(int(site), metrics.get("sample-epsilon"))
        self.round_stats = {"num_responded": len(good), "num_rejected": rejected, "num_failed": failed}
        return [good[s] for s in sorted(good)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, then the kit strategy's own ``aggregate`` (clipping/noise/ledger live there)."""
        parsed = self._parse(server_round, replies)
        updates, sent = [u for u, _ in parsed], [s for _, s in parsed]
        self.global_state = self.core.aggregate(self.global_state, updates, sent, server_round)
        metrics = {**self.round_stats,
                   "train_loss": float(np.mean([u.train_loss for u in updates])) if updates else float("nan")}
        return to_array_record(self.global_state), MetricRecord(metrics)

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        online = set(grid.get_node_ids())
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({**dict(config), "round": server_round})})
        return [Message(content=content, dst_node_id=node, message_type="evaluate", group_id=f"eval-{server_round}")
                for node in sorted(self.node_sites) if node in online]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """Pooled accuracies from per-site correct counts, plus each site's personal test accuracy."""
        totals: dict[str, int] = {}
        per_site: dict[str, float] = {}
        for reply in replies:
            if reply.has_error() or "metrics" not in reply.content.metric_records:
                continue
            m = reply.content.metric_records["metrics"]
            required = {"site", "val-n", "test-n",
                        *(f"{w}-{s}-correct" for w in ("global", "personal") for s in ("val", "test"))}
            if set(m) != required or any(not isinstance(v, (int, np.integer)) or v < 0 for v in m.values()) \
                    or any(m[f"{w}-{s}-correct"] > m[f"{s}-n"] for w in ("global", "personal") for s in ("val", "test")):
                logger.warning("round %d: rejected malformed evaluation reply %s", server_round, dict(m))
                continue
            for key, value in m.items():
                if key != "site":
                    totals[key] = totals.get(key, 0) + int(value)
            if m["test-n"] > 0:
                per_site[f"site{int(m['site'])}_personal_test_accuracy"] = m["personal-test-correct"] / m["test-n"]
        nan = float("nan")
        out = {f"{which}_{split}_accuracy": (totals[f"{which}-{split}-correct"] / totals[f"{split}-n"]
                                             if totals.get(f"{split}-n") else nan)
               for which in ("global", "personal") for split in ("val", "test")}
        # Every site gets its column (NaN when it did not answer), so metrics.csv keeps one set of columns.
        sites = {f"site{s}_personal_test_accuracy": per_site.get(f"site{s}_personal_test_accuracy", nan)
                 for s in self.all_sites}
        return MetricRecord({**out, **sites})

    def summary(self) -> None:
        logger.info("KitStrategy(%s, placement=%s)", self.core.name, getattr(getattr(self.core, "placement", None),
                                                                              "value", "n/a"))

    # ------------------------------------------------------------------ secure aggregation path
    def apply_secure_sum(self, server_round: int, total: State | None, num_participants: int,
                         train_losses: list[float]) -> None:
        """Server step under SecAgg+: only the SUM of the participants' noised updates is known.

        ``total`` is None when the protocol did not complete (too few survivors): the round is
        aborted by the kit strategy (nothing released, not charged).
        """
        if total is None:
            total = {n: torch.zeros_like(t) for n, t in self.global_state.items()}
            num_participants = 0
        self.global_state = self.core.release_sum(self.global_state, total, num_participants, server_round)
        self.round_stats = {"num_responded": num_participants, "num_rejected": 0,
                            "num_failed": len(self.selected) - num_participants}
        self._secure_losses = train_losses

    def note_site_epsilon(self, site: int, value: Any) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
            self.site_epsilons[site] = float(value)

    def round_row(self, server_round: int, train_loss: float) -> dict[str, Any]:
        """The metrics.csv row, with the in-process engine's columns first."""
        traffic, cumulative = self.counter.round_totals(server_round), self.counter.cumulative_totals(server_round)
        return {"round": server_round, "num_clients": len(self.selected), "train_loss": train_loss,
                "bytes_up": traffic["up"], "bytes_down": traffic["down"],
                "cum_bytes_up": cumulative["up"], "cum_bytes_down": cumulative["down"],
                **self.round_stats}
