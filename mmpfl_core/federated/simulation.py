"""The in-process round loop: one loop for every strategy, with evaluation, checkpoints and resume.

Round t, in order:
  1. the strategy selects clients (random stream ``(seed, 1, t)``);
  2. each selected client starts from ``strategy.client_start_state`` and runs :func:`local_update`
     (shuffling stream ``(seed, 2, t, site)``; torch's global RNG is forked and seeded from the same
     path, so dropout is reproducible and nothing outside the loop is touched);
  3. the strategy decides what each client transmits; the bytes are counted up and down;
  4. the strategy aggregates into the next global model;
  5. every ``eval_every`` rounds: global and personalised models on the validation and test splits;
  6. every ``checkpoint_every`` rounds: a safe checkpoint (safetensors + JSON).

Every non-secret random draw of round t derives from ``(seed, t, ...)`` alone, so a run resumed
from the checkpoint of round t continues exactly as the uninterrupted run would: the final metrics
match bit for bit (``tests/test_federated.py`` checks this). Secret draws are the exception: a
strategy with ``secret_randomness = True`` (every private strategy with its default
``noise="secure"``) samples its sites, its patients' batches and its noise from the OS CSPRNG
(:mod:`mmpfl_core.privacy.randomness`), never from the seed, and no state of them is checkpointed:
a resumed private run does not repeat the same bits. Its ledgers are write-ahead files in the run
directory (docs/DESIGN.md 4.8): a round released before a crash and run again after the resume is a second
release with fresh noise and is charged twice, so the final epsilon covers every release made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.contract import Cohort, CohortDataset, concatenate
from ..data.federation import Federation
from ..errors import ConfigError
from ..io.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from ..io.run_directory import RunDirectory
from ..metrics.classification import metrics_with_ci
from ..metrics.communication import CommunicationCounter
from ..metrics.convergence import rounds_to_target
from ..devices import resolve_device
from ..privacy.randomness import secure_numpy_generator
from ..seeding import Stream, numpy_generator, torch_generator
from .client import ClientUpdate, trainable_state
from .config import FederatedConfig
from .evaluation import evaluate_predictions, predict_proba, site_accuracies
from .strategies import State, StopTraining, Strategy


@dataclass
class RunResult:
    """What a run returns: the per-round history, the summary and the final models.

    ``final_predictions`` holds the summary's pooled test ``labels`` (N,) and the deployed models' ``personal``
    class scores (N, C), in the test split's subject order (the same for every method of one federation), for
    paired comparisons (:func:`~mmpfl_core.metrics.classification.paired_accuracy_difference`); in memory only,
    never written to a run directory (per-patient scores are operator-only)."""

    history: list[dict[str, Any]]
    summary: dict[str, Any]
    global_state: State
    strategy: Strategy
    final_predictions: dict[str, np.ndarray] = field(default_factory=dict)


def select_round(strategy: Strategy, client_ids: list[int], config: FederatedConfig, round_index: int) -> list[int]:
    """Server side, step 1: the clients of round t.

    Drawn from the stream ``(seed, 1, t)``, or, when the strategy declares ``secret_randomness``
    (a private strategy in its default ``noise="secure"`` mode), from the OS CSPRNG, the same source
    as the noise (:class:`~mmpfl_core.privacy.randomness.SecureRandom`: Poisson sampling compares
    CSPRNG uniforms with q; no key, no state), because amplification by sampling assumes nobody
    outside the protocol can tell who was sampled: a sample regenerated from the published seed, or
    from a keyed generator whose key could leak, would void it. Shared by the in-process loop and the
    Flower server app, so both engines pick the same sites whenever the sample is reproducible.
    """
    rng: Any  # numpy Generator or the CSPRNG's SecureRandom: both offer random()/choice()
    if getattr(strategy, "secret_randomness", False):
        rng = secure_numpy_generator()
    else:
        rng = numpy_generator(config.seed, Stream.SAMPLING, round_index)
    return strategy.select(sorted(client_ids), config, rng)


def client_round(
    strategy: Strategy,
    model: nn.Module,
    dataset: CohortDataset,
    *,
    site_id: int,
    global_state: State,
    round_index: int,
    config: FederatedConfig,
    device: torch.device,
) -> tuple[ClientUpdate, State]:
    """Site side of round t, step 2-3: start state, local training, personal state, what to transmit.

    The one client step of every engine: the in-process loop calls it for each selected site, the
    Flower client app calls it inside its ``train`` handler. Randomness comes only from the stream
    ``(seed, 2, t, site)`` (shuffling; torch's global RNG is forked and seeded from it, so dropout
    is reproducible and nothing outside is touched), so both engines train bit-identically given
    the same ``global_state``. ``model`` is the site's working copy and is modified in place.
    """
    start = strategy.client_start_state(site_id, global_state)
    model.load_state_dict(start, strict=False)
    generator = torch_generator(config.seed, Stream.TRAINING, round_index, site_id)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        update = strategy.local_training(
            model,
            dataset,
            site_id=site_id,
            global_state=global_state,
            round_index=round_index,
            config=config,
            generator=generator,
            device=device,
        )
    strategy.after_local(site_id, model)
    return update, strategy.transmit(update, round_index)


#: At most this many pooled rows score each site's own model on everyone's data (local-only's "global" accuracy,
#: the mean of the site models): a diagnostic, not a reported CI; its 95% half-width is about 0.03 at 1,024 rows.
CROSS_SITE_ROWS = 1024


class _SplitView:
    """One split (val or test) pooled over sites, remembering which rows belong to which site."""

    def __init__(self, cohorts: list[Cohort]) -> None:
        self.cohort = concatenate(cohorts)
        self.dataset = CohortDataset(self.cohort)
        self.per_site = {int(c.sites[0]) if len(c) else i: CohortDataset(c) for i, c in enumerate(cohorts)}

    @cached_property
    def cross_site(self) -> Cohort:
        """Rows on which every site's own model is scored (built only for strategies without a global model).

        Every site's model on the pooled split costs sites x rows forward passes (40 x 5,500 on the headline
        cohort: most of a local-only run). For that diagnostic only, rows evenly spaced over the pooled split
        (rows are grouped by site, so every site keeps its share), at most CROSS_SITE_ROWS of them."""
        rows = np.unique(np.linspace(0, len(self.cohort) - 1, min(len(self.cohort), CROSS_SITE_ROWS)).round())
        return self.cohort.subset(rows.astype(np.int64))

    @cached_property
    def cross_site_dataset(self) -> CohortDataset:
        return CohortDataset(self.cross_site)


class FederatedSimulation:
    """Runs a strategy over a federation in one process. See the module docstring for the round."""

    def __init__(
        self,
        federation: Federation,
        *,
        model_factory: Callable[[], nn.Module],
        strategy: Strategy,
        config: FederatedConfig,
        run_dir: RunDirectory | None = None,
        progress: bool = True,
    ) -> None:
        self.federation, self.strategy, self.config = federation, strategy, config
        self.run_dir, self.progress = run_dir, progress
        self.device = resolve_device(config.device)
        self.model = model_factory().to(self.device)
        self.num_classes = federation.sites[0].train.num_classes
        self.clients = strategy.client_datasets(federation)
        self.val = _SplitView([s.val for s in federation.sites])
        self.test = _SplitView([s.test for s in federation.sites])
        self.global_state: State = trainable_state(self.model)
        strategy.configure(config=config, federation=federation, client_ids=sorted(self.clients), model=self.model)
        self.counter = CommunicationCounter()
        self.history: list[dict[str, Any]] = []
        # (global, personal) test probabilities of the current models, from the last evaluate(); None once they
        # change. summarise() reuses them instead of predicting the test split a second time.
        self._test_predictions: tuple[np.ndarray | None, np.ndarray] | None = None
        self._summary_predictions: dict[str, np.ndarray] = {}  # the summary's test labels and personal scores

    # ------------------------------------------------------------------ round
    def run_round(self, t: int) -> dict[str, Any]:
        cfg = self.config
        self._test_predictions = None  # the models change below
        selected = select_round(self.strategy, sorted(self.clients), cfg, t)
        updates, sent = self.train_clients(selected, t)
        self.global_state = self.aggregate(updates, sent, t)
        traffic = self.counter.round_totals(t)
        cumulative = self.counter.cumulative_totals(t)
        row: dict[str, Any] = {
            "round": t,
            "num_clients": len(selected),
            "train_loss": float(np.mean([u.train_loss for u in updates])) if updates else float("nan"),
            "bytes_up": traffic["up"],
            "bytes_down": traffic["down"],
            "cum_bytes_up": cumulative["up"],
            "cum_bytes_down": cumulative["down"],
        }
        # Round 1 is always evaluated: it fixes the columns of metrics.csv and shows the starting point.
        row.update(self.strategy.round_report(t))
        if t == 1 or t % cfg.eval_every == 0 or t == cfg.num_rounds:
            row.update(self.evaluate())
        return row

    def train_clients(self, selected: list[int], t: int) -> tuple[list[ClientUpdate], list[State]]:
        """Steps 2-3 for the selected sites, in order: what each computed and what it transmitted.

        What another engine overrides, with :meth:`aggregate` and :meth:`count_traffic`
        (:class:`~.vectorized.VectorizedSimulation` trains the sites together); selection, the round's
        bookkeeping, evaluation and checkpoints stay here.
        """
        updates: list[ClientUpdate] = []
        sent: list[State] = []
        for site in selected:
            update, transmitted = client_round(
                self.strategy,
                self.model,
                self.clients[site],
                site_id=site,
                global_state=self.global_state,
                round_index=t,
                config=self.config,
                device=self.device,
            )
            self.count_traffic(t, site, transmitted)
            updates.append(update)
            sent.append(transmitted)
        return updates, sent

    def aggregate(self, updates: list[ClientUpdate], sent: list[State], t: int) -> State:
        """Step 4: the strategy's aggregation of what the sites transmitted."""
        return self.strategy.aggregate(self.global_state, updates, sent, t)

    def count_traffic(self, t: int, site: int, transmitted: State) -> None:
        """Bytes down (the strategy's broadcast) and up (what the site transmitted) of one site."""
        if self.strategy.communicates:
            self.counter.add_download(t, site, self.strategy.broadcast(site, self.global_state))
            self.counter.add_upload(t, site, transmitted)

    # ------------------------------------------------------------- evaluation
    def _proba(self, state: State, dataset: CohortDataset) -> np.ndarray:
        self.model.load_state_dict(state, strict=False)
        return predict_proba(self.model, dataset, batch_size=self.config.eval_batch_size, device=self.device)

    def _personal_proba(self, view: _SplitView, global_proba: np.ndarray | None) -> np.ndarray:
        """Each site's deployed model on its own rows; rows of sites without one reuse the global model."""
        parts = []
        for site, dataset in view.per_site.items():
            state = self.strategy.personal_state(site, self.global_state)
            if state is None and global_proba is not None:
                parts.append(global_proba[view.cohort.sites == site])
            else:
                parts.append(self._proba(state if state is not None else self.global_state, dataset))
        return np.concatenate(parts)

    def _deployed(self, site: int) -> State:
        """A site's deployed model where the strategy has no global one (local-only: always its own)."""
        state = self.strategy.personal_state(site, self.global_state)
        if state is None:
            raise RuntimeError(f"{self.strategy.name} has no global model and no deployed model for site {site}.")
        return state

    def _global_metrics(self, view: _SplitView, prefix: str) -> tuple[dict[str, float], np.ndarray | None]:
        labels = view.cohort.labels
        if self.strategy.has_global_model:
            proba = self._proba(self.global_state, view.dataset)
            return evaluate_predictions(labels, proba, self.num_classes, prefix), proba
        # Local-only has no global model: report the mean over the sites' own models on (evenly spaced rows of)
        # the pooled split.
        per_model = [
            evaluate_predictions(
                view.cross_site.labels,
                self._proba(self._deployed(s), view.cross_site_dataset),
                self.num_classes,
                prefix,
            )
            for s in view.per_site
        ]
        return {k: float(np.mean([m[k] for m in per_model])) for k in per_model[0]}, None

    def evaluate(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for view, split in ((self.val, "val"), (self.test, "test")):
            metrics, global_proba = self._global_metrics(view, f"global_{split}")
            out.update(metrics)
            personal = self._personal_proba(view, global_proba)
            out.update(evaluate_predictions(view.cohort.labels, personal, self.num_classes, f"personal_{split}"))
            if split == "test":
                self._test_predictions = (global_proba, personal)
                out.update(
                    {
                        f"site{s}_personal_test_accuracy": a
                        for s, a in site_accuracies(view.cohort.labels, personal, view.cohort.sites).items()
                    }
                )
        return out

    # ---------------------------------------------------------- checkpointing
    def _save(self, t: int) -> None:
        if self.run_dir is None or self.config.checkpoint_every == 0:
            return
        strategy_tensors, strategy_state = self.strategy.state_dict()
        save_checkpoint(
            checkpoint_path(self.run_dir.checkpoint_dir, t),
            tensors={"global": self.global_state, "strategy": strategy_tensors},
            state={
                "round": t,
                "communication": self.counter.state_dict(),
                "strategy": strategy_state,
                "history": self.history,
            },
        )
        prune_checkpoints(self.run_dir.checkpoint_dir, self.config.keep_checkpoints)
        self.run_dir.write_manifest()

    def _resume(self) -> int:
        """Restore the latest checkpoint if there is one; return the first round still to run."""
        if self.run_dir is None:
            return 1
        path = latest_checkpoint(self.run_dir.checkpoint_dir)
        if path is None:
            self.run_dir.truncate_after(0)
            self._attach_ledgers()
            return 1
        tensors, state = load_checkpoint(path)
        self._test_predictions = None
        self.global_state = {k: v.to(self.device) for k, v in tensors["global"].items()}
        self.strategy.load_state_dict(
            {k: v.to(self.device) for k, v in tensors.get("strategy", {}).items()}, state["strategy"]
        )
        self.counter.load_state_dict(state["communication"])
        self.history = list(state["history"])
        self.run_dir.truncate_after(int(state["round"]))
        self._attach_ledgers()
        return int(state["round"]) + 1

    def _attach_ledgers(self) -> None:
        """Write-ahead ledgers (docs/DESIGN.md 4.8): the strategy's ledgers append every release to their files
        in the run directory before it leaves, and adopt what the files already hold. A release made
        after the checkpoint just restored (the process died between a release and the next
        checkpoint) is in the file, so it stays charged; the round is then run again with fresh
        secret noise, a new release, and charged again. Nothing is ever forgotten."""
        attach = getattr(self.strategy, "attach_ledger_journals", None)
        if attach is None or self.run_dir is None:
            return
        attach(
            server=self.run_dir.ledger_path, site=self.run_dir.site_ledger_path, sites=self.run_dir.site_ledger_sites()
        )
        self.run_dir.write_manifest()

    # -------------------------------------------------------------------- run
    def run(self, *, stop_after: int | None = None) -> RunResult:
        """Run (or resume) to ``num_rounds``; ``stop_after`` ends early (used to test resume)."""
        cfg = self.config
        first = self._resume()
        last = cfg.num_rounds if stop_after is None else min(cfg.num_rounds, stop_after)
        rounds = tqdm(
            range(first, last + 1),
            desc=f"{self.strategy.name} rounds",
            disable=not self.progress,
            initial=first - 1,
            total=cfg.num_rounds,
        )
        stopped_early = None
        for t in rounds:
            started = time.perf_counter()
            try:
                self.strategy.before_round(t)
            except StopTraining as reason:
                stopped_early = f"stopped before round {t}: {reason}"
                break
            row = self.run_round(t)
            row["seconds"] = round(time.perf_counter() - started, 3)
            self.history.append(row)
            if self.run_dir is not None:
                self.run_dir.log_round(row)
            if cfg.checkpoint_every and (t % cfg.checkpoint_every == 0 or t == cfg.num_rounds):
                self._save(t)
            if "personal_val_accuracy" in row:
                rounds.set_postfix(val_acc=f"{row['personal_val_accuracy']:.3f}")
        finished = last == cfg.num_rounds or stopped_early is not None
        summary = self.summarise() if finished and self.history else {}
        if summary:
            summary["stopped_early"] = stopped_early
        if summary and self.run_dir is not None:
            self.run_dir.write_summary(summary)
        return RunResult(
            history=self.history,
            summary=summary,
            global_state=self.global_state,
            strategy=self.strategy,
            final_predictions=dict(self._summary_predictions) if summary else {},
        )

    def summarise(self) -> dict[str, Any]:
        """Final metrics with bootstrap 95% CIs, rounds-to-target, total communication."""
        cfg = self.config
        rng = numpy_generator(cfg.seed, Stream.EVAL_BOOTSTRAP)
        labels = self.test.cohort.labels
        if self._test_predictions is not None:  # the final round was evaluated: the same models, the same predictions
            global_proba, personal = self._test_predictions
        else:
            global_proba = self._proba(self.global_state, self.test.dataset) if self.strategy.has_global_model else None
            personal = self._personal_proba(self.test, global_proba)
        # kept in memory (never written: per-patient scores are operator-only) for paired comparisons of methods
        self._summary_predictions = {"labels": np.asarray(labels), "personal": np.asarray(personal)}
        summary: dict[str, Any] = {"strategy": self.strategy.name, "num_rounds": cfg.num_rounds, "seed": cfg.seed}
        if cfg.bootstrap_resamples:
            summary["personal_test"] = metrics_with_ci(labels, personal, rng=rng, num_resamples=cfg.bootstrap_resamples)
            if global_proba is not None:
                summary["global_test"] = metrics_with_ci(
                    labels, global_proba, rng=rng, num_resamples=cfg.bootstrap_resamples
                )
        evaluated = [r for r in self.history if "personal_val_accuracy" in r]
        # Convergence of what the sites deploy: their personal models where the method has them, else the
        # global model (FedAvg's curve is its global model's). Personalised methods keep part of the model
        # local, so their global model alone is not what they are judged on.
        curve = [r["personal_val_accuracy"] for r in evaluated]
        reached = rounds_to_target(curve, cfg.target_accuracy, window=cfg.smoothing_window)
        summary["target_accuracy"] = cfg.target_accuracy
        summary["rounds_to_target"] = None if reached is None else int(evaluated[reached - 1]["round"])
        summary["megabytes_up"] = self.counter.megabytes("up")
        summary["megabytes_down"] = self.counter.megabytes("down")
        if reached is not None:
            at = summary["rounds_to_target"]
            totals = self.counter.cumulative_totals(at)
            summary["megabytes_to_target"] = (totals["up"] + totals["down"]) / 1e6
        # Wall time is left out so that a resumed run and an uninterrupted one have equal summaries.
        summary["final"] = {k: v for k, v in self.history[-1].items() if isinstance(v, (int, float)) and k != "seconds"}
        summary.update(self.strategy.summary_report())
        return summary


#: Engines by the name ``FederatedConfig.engine`` takes; :mod:`.vectorized` registers itself (importing the
#: ``federated`` package registers every engine, as it does every strategy, without an import circle).
ENGINES: dict[str, type[FederatedSimulation]] = {"loop": FederatedSimulation}


def run_federated(
    federation: Federation,
    *,
    model_factory: Callable[[], nn.Module],
    strategy: Strategy,
    config: FederatedConfig,
    run_dir: RunDirectory | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> RunResult:
    """Convenience wrapper: build the simulation of ``config.engine`` and run it.

    ``engine="loop"`` (the reference) is :class:`FederatedSimulation`; ``"vectorized"`` is
    :class:`~.vectorized.VectorizedSimulation`, which trains a round's sites together.
    """
    if config.engine not in ENGINES:
        raise ConfigError(f"engine {config.engine!r} is not registered; use one of {sorted(ENGINES)}.")
    sim = ENGINES[config.engine](
        federation, model_factory=model_factory, strategy=strategy, config=config, run_dir=run_dir, progress=progress
    )
    return sim.run(stop_after=stop_after)
