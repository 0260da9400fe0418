"""The site (hospital) side of the Flower app: one SuperNode = one site = ``partition-id``.

Thin: each handler maps Flower records to the kit's types and calls the engine's own client step,
:func:`mmpfl_core.federated.simulation.client_round` (start state, local training with the RNG
stream (seed, 2, t, site), personal-state update, clipping/noise/masking by the strategy's
``transmit``). So a site computes exactly what the in-process engine computes for it. Its noise
(distributed/local placement: its share sigma_g^2 / m for the m participants the server announced)
is drawn HERE, from this SuperNode's OS CSPRNG by default: the server never learns it. Only
``noise="reproducible-insecure"`` derives it from the shared seed (teaching; not private).

State that must survive rounds (personal groups, masks and their scores history, the site's
sample-level DP ledger) is the site strategy's ``state_dict``, kept in ``context.state`` (an
ArrayRecord plus a JSON ConfigRecord), never in process memory: Flower may run a site's rounds in
different processes (simulation) and a restarted SuperNode keeps its ``context``.

Messages (current Message API):
  * ``query``: reply with this node's site id (the server maps node ids to sites once).
  * ``train``: arrays = global model, config = the method and site (transport) and the round's
    release, whole (:class:`~mmpfl_core.privacy.release.RoundRelease` record: round, C and C_g,
    sigma_g, the noise gate's drowned groups, m, qN, q, z_eff, noise mode; all public). Every key
    but the transport's goes to the site strategy's ``apply_round_instructions``, which refuses a
    missing or unknown one: no hand-picked subset (one dropped the noise gate's decision and
    released gated groups with no noise, issue 21).
    Reply: arrays = what the strategy transmits, metrics = site, num-examples, train-loss, ...
    Under SecAgg+ (``secaggplus_mod``, distributed placement) the same step runs in the legacy
    FitIns/FitRes layout, the site checks its values fit the quantisation range, and only the
    masked vector leaves the site.
  * ``evaluate``: accuracy of the global and of the site's personal model on its val/test splits.

What leaves the site besides the update (docs/DESIGN.md 4.6): train loss, example count and accuracies.
They are NOT covered by the client-level guarantee; they are reported for teaching and should be
dropped or noised in a real deployment (``num-examples`` is sent as 1 under SecAgg+).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from mmpfl_core.errors import PrivacyError
from mmpfl_core.federated.dp_strategies import DPFedAvg
from mmpfl_core.federated.evaluation import predict_proba
from mmpfl_core.federated.simulation import client_round
from mmpfl_core.privacy.dp_sgd import SampleLevelDP  # noqa: F401  (documents the local ledger's type)

from .task import (Job, check_secagg_values, configured_strategy, global_names, load_job, new_model,
                   numpy_to_state, restore_strategy_state, site_data, state_to_numpy, strategy_state_to_json)

_STATE = "mmpfl.{}.site-{}"  # per method label: tensors / JSON state
#: Keys of a train message's config that address the message (which method, which site); every other
#: key is the round's release record and goes to the site strategy whole.
TRANSPORT_KEYS = ("method", "site")


_OBJECTS: dict[str, tuple[torch.nn.Module, Any, tuple[dict, str]]] = {}


def _site_objects(key: str, job: Job) -> tuple[torch.nn.Module, Any, tuple[dict, str]]:
    """Per-process working model and configured strategy (its fresh state kept to reset between sites)."""
    if key not in _OBJECTS:
        _OBJECTS.clear()
        model = new_model(job)
        strategy = configured_strategy(job, model)
        tensors, text = strategy_state_to_json(strategy)
        _OBJECTS[key] = (model, strategy, ({n: t.clone() for n, t in tensors.items()}, text))
    return _OBJECTS[key]


def _site(msg: Message, context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no partition-id; start it with --node-config 'partition-id=<site>'.")
    return int(context.node_config["partition-id"])


def _load(job: Job, context: Context):
    """Model + strategy holding THIS site's state from ``context.state`` (fresh state on its first round)."""
    model, strategy, fresh = _site_objects(job.key(), job)
    tensors_key, json_key = _STATE.format(job.method.label, "tensors"), _STATE.format(job.method.label, "state")
    if json_key in context.state.config_records:
        tensors = {n: torch.from_numpy(a.numpy().copy()) for n, a in context.state.array_records[tensors_key].items()} \
            if tensors_key in context.state.array_records else {}
        restore_strategy_state(strategy, tensors, str(context.state.config_records[json_key]["json"]))
    else:
        restore_strategy_state(strategy, {n: t.clone() for n, t in fresh[0].items()}, fresh[1])
    return model, strategy


def _save(job: Job, strategy: Any, context: Context) -> None:
    tensors, text = strategy_state_to_json(strategy)
    arrays = {n: _array(a) for n, a in state_to_numpy(tensors).items()}
    context.state.array_records[_STATE.format(job.method.label, "tensors")] = ArrayRecord(arrays)
    context.state.config_records[_STATE.format(job.method.label, "state")] = ConfigRecord({"json": text})


def _array(a: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(a))


def _train_step(job: Job, context: Context, global_arrays: dict[str, np.ndarray], config: dict[str, Any]):
    """Run the engine's client step for this site; return (transmitted arrays, metrics)."""
    site = _site(None, context)  # type: ignore[arg-type]
    if int(config["site"]) != site:
        raise ValueError(f"message for site {config['site']} reached the SuperNode of site {site}.")
    t = int(config["round"])
    model, strategy = _load(job, context)
    release_record = {k: v for k, v in config.items() if k not in TRANSPORT_KEYS}
    if not isinstance(strategy, DPFedAvg) and set(release_record) != {"round"}:
        raise PrivacyError(f"method {job.method.label!r} ({strategy.name}) takes no release instructions, but the "
                           f"server sent {sorted(set(release_record) - {'round'})}: server and site run different "
                           "configurations.")
    strategy.apply_round_instructions(t, release_record)
    data = site_data(job, site)
    update, sent = client_round(strategy, model, data["train"], site_id=site, global_state=numpy_to_state(global_arrays),
                                round_index=t, config=job.experiment.federated, device=torch.device("cpu"))
    _save(job, strategy, context)
    metrics: dict[str, float | int] = {"site": site, "num-examples": int(update.num_examples),
                                       "train-loss": float(update.train_loss), "num-steps": int(update.num_steps)}
    report = strategy.round_report(t) if hasattr(strategy, "sample_dp") else {}
    if "sample_epsilon_max" in report:  # this site's own DP-SGD ledger (epsilon where local)
        metrics["sample-epsilon"] = float(report["sample_epsilon_max"])
    return state_to_numpy(sent), metrics


def make_client_app(**overrides: Any) -> ClientApp:
    """The ClientApp; ``overrides`` (run-config keys with ``_``) are for in-process ``run_simulation`` runs."""

    def _secagg_if_asked(msg: Message, context: Context, call_next):
        # SecAgg+ messages carry its config record; plain train messages go straight through.
        if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
            return secaggplus_mod(msg, context, call_next)
        return call_next(msg, context)

    app = ClientApp(mods=[_secagg_if_asked])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"site": MetricRecord({"site": _site(msg, context)})}), reply_to=msg)

    def job_for(config: Any, context: Context) -> Job:
        # The server names the method of each message (one run may train several methods in turn).
        return load_job(context.run_config, **{**overrides, "method": str(config["method"])})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if RECORD_KEY_CONFIGS in msg.content.config_records:  # SecAgg+ collect stage: legacy layout
            fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
            job = job_for(fitins.config, context)
            model = _site_objects(job.key(), job)[0]
            names = global_names(model)
            arrays = dict(zip(names, parameters_to_ndarrays(fitins.parameters)))
            sent, metrics = _train_step(job, context, arrays, dict(fitins.config))
            extra = [n for n in sent if n not in names]
            # SecAgg+ sums fixed-length vectors: a group nobody releases (drowned) is not sent, so its slot
            # carries zeros (data-independent; the server ignores it, RoundRelease / release_sum).
            ordered = [sent[n] if n in sent else np.zeros_like(arrays[n]) for n in names] + \
                      [sent[n] for n in sorted(extra)]
            check_secagg_values(dict(zip(names + sorted(extra), ordered)), job.flower)
            # Weight 1: SecAgg+ returns the mean of the masked vectors; the server multiplies back to the sum.
            fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(ordered), 1,
                            {k: v for k, v in metrics.items() if k != "num-examples"})
            return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
        config = dict(msg.content.config_records["config"])
        job = job_for(config, context)
        arrays = {n: a.numpy() for n, a in msg.content.array_records["arrays"].items()}
        sent, metrics = _train_step(job, context, arrays, config)
        content = RecordDict({"arrays": ArrayRecord({n: _array(a) for n, a in sent.items()}),
                              "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        job = job_for(msg.content.config_records["config"], context)
        site = _site(msg, context)
        model, strategy = _load(job, context)
        global_state = numpy_to_state({n: a.numpy() for n, a in msg.content.array_records["arrays"].items()})
        personal = strategy.personal_state(site, global_state)
        data = site_data(job, site)
        out: dict[str, float | int] = {"site": site}
        batch = job.experiment.federated.eval_batch_size
        for split in ("val", "test"):
            labels = data[split].cohort.labels
            for which, state in (("global", global_state), ("personal", personal if personal is not None else global_state)):
                model.load_state_dict(state, strict=False)
                proba = predict_proba(model, data[split], batch_size=batch, device=torch.device("cpu"))
                out[f"{which}-{split}-correct"] = int((proba.argmax(1) == labels).sum())
            out[f"{split}-n"] = int(len(labels))
        return Message(RecordDict({"metrics": MetricRecord(out)}), reply_to=msg)

    return app


app = make_client_app()
