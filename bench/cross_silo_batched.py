"""Per-round time of the cross-silo strategies, site by site (``batched_sites=False``, the reference) against the
round's sites in one batched pass (``batched_sites=True``, the default): ratios, not a timed test.

Size of ``make demo`` (``configs/headline.yaml``, read from the config): 40 hospitals of ~18 training patients,
hybrid-tiny at 32 px with the private part head + every bias and norm (d = 2,915;
random weights: the time does not depend on the pretraining), q N = 128 patients a round. ``cross-silo-dp-sgd``
shares everything (one Opacus pass over the union); ``mm-pfl-adp-cross-silo`` keeps the head at every site and
masks the rest (per-patient parameters through ``vmap``). Round 1 (the first Fisher, and the Opacus / vmap
warm-up) is run untimed; the median of the next ``--rounds`` rounds is reported, evaluation switched off, the
two paths' rounds interleaved (the machine may be shared: run it with ``nice`` and read the ratio, not the seconds).

    nice -n 10 python bench/cross_silo_batched.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmpfl_core.experiment import make_federation, model_factory
from mmpfl_core.experiment_config import load_experiment
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.simulation import FederatedSimulation
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.pretraining import restrict_trainable

ARMS = {
    "cross-silo-dp-sgd": {},
    "mm-pfl-adp-cross-silo": {"mask": {"always_personal": ["head"]}},
}


def _federation():
    return make_federation(load_experiment("headline"))


def _simulation(federation, strategy: str, kwargs: dict, *, batched: bool) -> FederatedSimulation:
    base = model_factory(load_experiment("headline"), federation)

    def factory():
        model = base()
        restrict_trainable(model, "head+bias")
        return model

    config = FederatedConfig(num_rounds=200, client_fraction=1.0, eval_every=10**6, checkpoint_every=0,
                             bootstrap_resamples=0, seed=0, device="cpu",
                             local=LocalTrainingConfig(local_epochs=1, batch_size=16),
                             optimizer=OptimizerConfig(name="adamw", lr=0.005, weight_decay=0.0))  # fmt: skip
    arm = create_strategy(strategy, noise_multiplier=1.0, expected_batch_size=128, batched_sites=batched, **kwargs)
    sim = FederatedSimulation(federation, model_factory=factory, strategy=arm, config=config, progress=False)
    sim.evaluate = lambda: {}  # time training only (the loop evaluates round 1)
    sim.run_round(1)  # untimed: the first Fisher, the Opacus / vmap warm-up
    return sim


def _round_seconds(federation, strategy: str, kwargs: dict, *, rounds: int) -> tuple[float, float]:
    """Median seconds of a round (site by site, batched), the two paths' rounds interleaved so that a change
    of the shared machine's load hits both."""
    sims = {b: _simulation(federation, strategy, kwargs, batched=b) for b in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for t in range(2, rounds + 2):
        for batched, sim in sims.items():
            started = time.perf_counter()
            sim.run_round(t)
            times[batched].append(time.perf_counter() - started)
    assert sims[True].strategy.batched_hits == 40 * (rounds + 1) and sims[False].strategy.batched_hits == 0
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per arm and path (median reported)")
    args = parser.parse_args()
    federation = _federation()
    n = sum(len(s.train) for s in federation.sites)
    print(f"40 sites, {n} training patients, q N = 128; torch threads {torch.get_num_threads()}")
    for strategy, kwargs in ARMS.items():
        loop, batched = _round_seconds(federation, strategy, kwargs, rounds=args.rounds)
        print(f"{strategy:24s} per round: site by site {loop:.3f} s, batched {batched:.3f} s, "
              f"ratio loop/batched {loop / batched:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
