"""The server side of the Flower app: map nodes to sites, run the rounds, write the run directory.

Round t (the in-process engine's round, :mod:`mmpfl_core.federated.simulation`, with transport):
  1. ``before_round`` (budget stop), selection (secret for a private strategy: OS entropy, never the
     seed), the announced participant count m, public instructions;
  2. the selected sites train (``client_app.py``), each drawing its own noise on its SuperNode
     (the server never learns it), and reply; or, with ``distributed`` placement, SecAgg+
     (``SecAggPlusWorkflow``, threshold m) returns only the sum of their updates;
  3. validation, the kit strategy's aggregation and ledger (:class:`.strategy.KitStrategy`);
  4. evaluation on the sites every ``eval_every`` rounds (and rounds 1 and T);
  5. a row of ``metrics.csv``; at the end a checkpoint of the global model and ``summary.json`` in
     ``results/flower/<preset>/<method>-flower/``: the layout of the in-process engine.

Epsilon is read only from the kit strategy's ledger (``round_report`` / ``summary_report``).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp

from mmpfl_core.federated.client import trainable_state
from mmpfl_core.federated.dp_strategies import CLIP_INDICATOR
from mmpfl_core.federated.simulation import select_round
from mmpfl_core.federated.strategies import StopTraining
from mmpfl_core.io.checkpoint import checkpoint_path, save_checkpoint
from mmpfl_core.io.run_directory import RunDirectory, RunDirectoryError
from mmpfl_core.configuration import to_plain

from .task import Job, check_secagg_range, configured_strategy, global_names, load_jobs, new_model, results_dir
from .strategy import KitStrategy, to_array_record

logger = logging.getLogger(__name__)


def wait_for_sites(grid: Grid, job: Job) -> dict[int, int]:
    """Wait (bounded by ``node-wait``) for ``min-nodes`` SuperNodes, then ask each for its site id."""
    deadline = time.monotonic() + job.flower.node_wait
    nodes = list(grid.get_node_ids())
    while len(nodes) < job.flower.min_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of min-nodes={job.flower.min_nodes} SuperNodes connected within "
                               f"node-wait={job.flower.node_wait}s; start more SuperNodes or lower min-nodes.")
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    # The first message a SuperNode gets starts its ClientApp process (imports torch, builds its data):
    # give it the node-wait budget, not the round timeout.
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes],
                                    timeout=max(1.0, deadline - time.monotonic()) + job.flower.round_timeout)
    mapping: dict[int, int] = {}
    for reply in replies:
        if reply.has_error():
            continue
        site = int(reply.content.metric_records["site"]["site"])
        if site in mapping.values():
            raise ValueError(f"two SuperNodes claim site {site}; give each its own partition-id.")
        mapping[reply.metadata.src_node_id] = site
    if len(mapping) < job.flower.min_nodes:
        raise TimeoutError(f"only {len(mapping)} of min-nodes={job.flower.min_nodes} SuperNodes told their site in "
                           "time; raise node-wait (a cold ClientApp start imports torch) or lower min-nodes.")
    return mapping


class _SecAggAdapter(LegacyStrategy):
    """The legacy strategy interface SecAgg+ calls: hands it our selection, takes back the sum."""

    def __init__(self, kit: KitStrategy, grid: Grid, run_id: int, instructions: dict[str, float]) -> None:
        self.kit, self.grid, self.run_id, self.instructions = kit, grid, run_id, instructions
        self.result: tuple[list[np.ndarray], int, list[float]] | None = None

    def initialize_parameters(self, client_manager):  # noqa: D102
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
        online = set(self.grid.get_node_ids())
        out = []
        for site in self.kit.selected:
            node = self.kit.site_nodes.get(site)
            if node is None or node not in online:
                continue
            self.kit.counter.add_download(server_round, site, self.kit.global_state)
            out.append((GridClientProxy(node, self.grid, self.run_id),
                        FitIns(parameters, {"round": server_round, "site": site, "method": self.kit.job.method.label,
                                                   **self.instructions})))
        return out

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        if results:
            # Every result carries the same unmasked MEAN (weights 1); m times it is the sum.
            mean = parameters_to_ndarrays(results[0][1].parameters)
            losses = [float(r.metrics.get("train-loss", float("nan"))) for _, r in results]
            for _, r in results:
                if "site" in r.metrics:
                    self.kit.note_site_epsilon(int(r.metrics["site"]), r.metrics.get("sample-epsilon"))
            self.result = (mean, len(results), losses)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: D102
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: D102
        return None


def secure_round(grid: Grid, context: Context, kit: KitStrategy, job: Job, names: list[str], t: int) -> None:
    """One distributed round: the server learns only the sum of the m announced, noised updates.

    m = number of selected, connected sites, announced to them (each adds sigma^2 / m). m >= 2:
    SecAgg+ with reconstruction threshold m. m = 1: a plain message (the one noised update is the
    sum). m = 0 or a failed secure sum: the server's top-up noise alone (``release_sum``). The same
    release as the in-process engine, which has no threshold either.
    """
    core = kit.core
    kit.selected = select_round(core, sorted(kit.site_nodes), job.experiment.federated, t)
    reachable = kit.reachable(t, grid)
    core.announce_participants(len(reachable))
    instructions = core.round_instructions(t, kit.global_state)
    if len(reachable) < 2:  # SecAgg+ needs two parties; one participant's update is the sum itself
        kit._secure_losses = []
        if not reachable:
            kit.apply_secure_sum(t, None, 0, [])
            return
        replies = grid.send_and_receive(kit.train_messages(t, reachable, to_array_record(kit.global_state),
                                                           ConfigRecord({"method": job.method.label}), instructions),
                                        timeout=job.flower.round_timeout)
        _, metrics = kit.aggregate_train(t, replies)
        kit._secure_losses = [float(metrics["train_loss"])]
        return
    kit.secagg_refusal_bound = max(kit.secagg_refusal_bound,
                                   check_secagg_range(core, instructions, job.flower,
                                                      rounds=job.experiment.federated.num_rounds))
    adapter = _SecAggAdapter(kit, grid, context.run_id, instructions)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=job.experiment.federated.num_rounds),
                           strategy=adapter, client_manager=SimpleClientManager())
    order = names + ([CLIP_INDICATOR] if getattr(core, "adaptive", False) else [])
    arrays = [kit.global_state[n].numpy() for n in names] + \
             ([np.zeros(1, dtype=np.float64)] if CLIP_INDICATOR in order else [])
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(arrays[:len(names)]), keep_input=True)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: t})
    SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=len(reachable),
                       clipping_range=job.flower.secagg_clipping_range,
                       quantization_range=job.flower.secagg_quantization_range, max_weight=1.0,
                       timeout=job.flower.round_timeout)(grid, legacy)
    if adapter.result is None:
        kit.apply_secure_sum(t, None, 0, [])
        return
    mean, m, losses = adapter.result
    total = {n: torch.from_numpy(np.asarray(a, dtype=np.float64) * m).to(kit.global_state[n].dtype)
             if n in kit.global_state else torch.from_numpy(np.asarray(a, dtype=np.float64) * m)
             for n, a in zip(order, mean)}
    for site in kit.selected[:m]:  # bytes of the (unmasked-equivalent) update of each participant
        kit.counter.add_upload(t, site, {n: total[n] for n in names})
    kit.apply_secure_sum(t, total, m, losses)


def open_run_directory(job: Job, run_config: dict[str, Any], core: Any) -> RunDirectory:
    """The run directory of a Flower run, its privacy ledger writing ahead to ``private/ledger.jsonl``.

    A Flower run is not resumed (a restarted server starts from round 1 with a fresh model). A run
    name whose ledger already records a release is refused: a fresh ledger there would forget
    those releases (docs/DESIGN.md 4.8), and adding the restarted run's releases to them would charge a
    model nobody continues. A run name with no recorded release (a run that died before its first
    release) is reused.

    Raises:
        RunDirectoryError: the run name already has releases in its ledger (choose another).
    """
    root, name = results_dir(job), job.flower.run_name
    existing = root / name
    if (existing / "config.json").is_file() and RunDirectory(existing).has_releases():
        raise RunDirectoryError(
            f"Flower run {existing} already recorded releases in its privacy ledger (private/ledger.jsonl); a "
            "restarted Flower server does not resume, and reusing the name would forget them. Set another "
            "run-name (or results-dir); keep the old directory, its releases stay spent.")
    run_dir = RunDirectory.create(root, name, run_config, exist_ok_resume=True)
    run_dir.truncate_after(0)  # a Flower run is not resumed: start its metrics afresh
    attach = getattr(core, "attach_ledger_journals", None)
    if attach is not None:  # every release is on disk before the server returns the new model
        attach(server=run_dir.ledger_path, site=run_dir.site_ledger_path, sites=run_dir.site_ledger_sites())
    return run_dir


def run_rounds(grid: Grid, context: Context, job: Job) -> dict[str, Any]:
    """The whole run; returns the summary (also written to the run directory)."""
    cfg = job.experiment.federated
    model = new_model(job)
    core = configured_strategy(job, model)
    node_sites = wait_for_sites(grid, job)
    kit = KitStrategy(job, core, trainable_state(model), node_sites)
    names = global_names(model)
    run_config = {**job.experiment.to_dict(), "method": to_plain(job.method), "engine": "flower",
                  "flower": to_plain(job.flower)}
    run_config.pop("methods")
    run_dir = open_run_directory(job, run_config, core)
    history: list[dict[str, Any]] = []
    stopped = None
    for t in range(1, cfg.num_rounds + 1):
        started = time.perf_counter()
        try:
            core.before_round(t)
        except StopTraining as reason:
            stopped = f"stopped before round {t}: {reason}"
            break
        if job.flower.secagg:
            secure_round(grid, context, kit, job, names, t)
            losses = getattr(kit, "_secure_losses", [])
            train_loss = float(np.mean(losses)) if losses else float("nan")
        else:
            replies = grid.send_and_receive(list(kit.configure_train(t, to_array_record(kit.global_state),
                                                                     ConfigRecord({"method": job.method.label}), grid)),
                                            timeout=job.flower.round_timeout)
            _, metrics = kit.aggregate_train(t, replies)
            train_loss = float(metrics["train_loss"])
        row = kit.round_row(t, train_loss)
        row.update(core.round_report(t))
        if "sample_epsilon_max" in row:  # per-patient DP-SGD: the max over the sites' own ledgers, as in-process
            row["sample_epsilon_max"] = max(kit.site_epsilons.values(), default=0.0)
        if t == 1 or t % cfg.eval_every == 0 or t == cfg.num_rounds:
            replies = grid.send_and_receive(list(kit.configure_evaluate(t, to_array_record(kit.global_state),
                                                                        ConfigRecord({"method": job.method.label}), grid)),
                                            timeout=job.flower.round_timeout)
            row.update(dict(kit.aggregate_evaluate(t, replies)))
        row["seconds"] = round(time.perf_counter() - started, 3)
        history.append(row)
        run_dir.log_round(row)
        logger.info("round %d: %s", t, {k: v for k, v in row.items() if not k.startswith("site")})
    last = history[-1]["round"] if history else 0
    strategy_tensors, strategy_state = core.state_dict()
    save_checkpoint(checkpoint_path(run_dir.checkpoint_dir, last),
                    tensors={"global": kit.global_state, "strategy": strategy_tensors},
                    state={"round": last, "communication": kit.counter.state_dict(), "strategy": strategy_state,
                           "history": history})
    summary: dict[str, Any] = {"strategy": core.name, "engine": "flower", "num_rounds": cfg.num_rounds, "seed": cfg.seed,
                               "rounds_run": last, "stopped_early": stopped,
                               "megabytes_up": kit.counter.megabytes("up"), "megabytes_down": kit.counter.megabytes("down"),
                               "final": {k: v for k, v in (history[-1] if history else {}).items()
                                         if isinstance(v, (int, float)) and k != "seconds"},
                               "flower": {"secagg": job.flower.secagg, "nodes": {str(n): s for n, s in node_sites.items()},
                                          "secagg_clipping_range": job.flower.secagg_clipping_range,
                                          "secagg_quantization_range": job.flower.secagg_quantization_range,
                                          **_secagg_delta(job, core, kit),
                                          "outside_guarantee": "per-site train loss, example counts and accuracies"}}
    summary.update(core.summary_report())
    run_dir.write_summary(summary)
    return summary


def _secagg_delta(job: Job, core: Any, kit: KitStrategy) -> dict[str, Any]:
    """Under SecAgg+, a site refuses to send when a noised value leaves [-R, R]: an event of probability
    at most beta over the run (checked every round, task.check_secagg_range) on which the release
    differs, so the run is (epsilon, delta + beta)-DP: reported beside the accountant's epsilon."""
    if not job.flower.secagg:
        return {}
    beta = job.flower.secagg_refusal_probability
    return {"secagg_refusal_probability": beta, "secagg_refusal_bound_max": kit.secagg_refusal_bound,
            "delta_with_secagg_refusal": float(core.delta) + beta}


def make_server_app(**overrides: Any) -> ServerApp:
    """The ServerApp; ``overrides`` (run-config keys with ``_``) are for in-process ``run_simulation`` runs."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for job in load_jobs(context.run_config, **overrides):  # several methods share one start-up
            run_rounds(grid, context, job)

    return app


app = make_server_app()
