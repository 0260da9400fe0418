"""The vectorised engine against the loop engine (the reference): same releases, same epsilon.

Every comparison steps both engines round by round on a small federation with UNEQUAL site sizes
(so chunks pad batches and freeze sites whose schedule ended) and checks the released global model
after every round to float32 tolerance, and the epsilon the ledger reports exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from mmpfl_core.data.federation import FederationConfig, build_federation
from mmpfl_core.data.synthetic import SyntheticCohortConfig
from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.simulation import FederatedSimulation, run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.federated.client import ClientUpdate
from mmpfl_core.federated.vectorized import (VectorizedSimulation, _plan_chunk, _SitePool, _StackedOptimizer,
                                             clipped_sum, site_batches, train_stacked)
from mmpfl_core.io.run_directory import RunDirectory
from mmpfl_core.models.presets import create_model

# The regime map's small model (16 px, one block).
SMALL = dict(image_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
DP = dict(accountant="rdp", delta=1e-5, clip_norm=0.5, noise="reproducible-insecure")
ATOL = 2e-5  # float32: the batched kernels sum in another order than one site's kernels
# AdamW divides by sqrt(v) + 1e-8: a coordinate whose gradient is (near) 0, such as the attention's key
# bias (softmax ignores a shift shared by all keys), steps by up to +-lr with the sign of float noise, in
# any two float implementations. So the strict comparisons use SGD with momentum, and the AdamW case
# allows a tenth of one step (the model moves by ~lr per step on every coordinate with a real gradient).
ADAMW = OptimizerConfig(name="adamw", lr=3e-3)
ADAMW_ATOL = 0.1 * ADAMW.lr


@pytest.fixture(scope="module")
def uneven_federation():
    federation = build_federation(SyntheticCohortConfig(num_subjects=130, image_size=16, seed=3),
                                  FederationConfig(num_sites=6, alpha=0.5, public_size=16, min_subjects_per_site=6,
                                                   seed=3))
    sizes = [len(s.train) for s in federation.sites]
    assert len(set(sizes)) >= 4, sizes  # unequal sizes, or the test would not exercise padding
    return federation


def _factory():
    return create_model("tiny", seed=0, **SMALL)


def _config(**changes) -> FederatedConfig:
    base = FederatedConfig(num_rounds=3, local=LocalTrainingConfig(local_epochs=1, batch_size=8),
                           optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9), bootstrap_resamples=0,
                           checkpoint_every=0,
                           eval_every=100, device="cpu")
    return dataclasses.replace(base, **changes)


def _pair(federation, config, name, kwargs, chunk_size=None):
    loop = FederatedSimulation(federation, model_factory=_factory, strategy=create_strategy(name, **kwargs),
                               config=config, progress=False)
    vec = VectorizedSimulation(federation, model_factory=_factory, strategy=create_strategy(name, **kwargs),
                               config=dataclasses.replace(config, engine="vectorized", chunk_size=chunk_size),
                               progress=False)
    for sim in (loop, vec):
        sim.evaluate = lambda: {}  # the comparison is of releases; evaluation is shared code
    return loop, vec


def _assert_same_rounds(loop, vec, rounds, atol=ATOL):
    for t in range(1, rounds + 1):
        loop.strategy.before_round(t)
        vec.strategy.before_round(t)
        row_loop, row_vec = loop.run_round(t), vec.run_round(t)
        assert row_vec["num_clients"] == row_loop["num_clients"]
        for name, value in loop.global_state.items():
            torch.testing.assert_close(vec.global_state[name], value, atol=atol, rtol=1e-4,
                                       msg=lambda m: f"round {t}, {name}: {m}")
        assert row_vec.get("epsilon") == row_loop.get("epsilon")
        assert row_vec["bytes_up"] == row_loop["bytes_up"] and row_vec["bytes_down"] == row_loop["bytes_down"]
        assert row_vec["train_loss"] == pytest.approx(row_loop["train_loss"], rel=1e-4)
    return row_loop, row_vec


CASES = {
    "fedavg": ("fedavg", {}, {}),
    "fedavg-adamw": ("fedavg", {}, dict(optimizer=ADAMW)),
    "fedavg-sgd-clip-2-epochs": ("fedavg", {}, dict(optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.0,
                                                                              weight_decay=0.0),
                                                    local=LocalTrainingConfig(local_epochs=2, batch_size=8,
                                                                              max_grad_norm=0.5))),
    "fedprox": ("fedprox", {"mu": 0.5}, {}),
    "local": ("local", {}, dict(local=LocalTrainingConfig(local_steps=3, batch_size=8))),
    "centralized": ("centralized", {}, {}),
    "dp-fedavg-server": ("dp-fedavg", {**DP, "target_epsilon": 8.0}, dict(client_fraction=0.7, sampling="poisson")),
    "dp-fedavg-fisher-server": ("dp-fedavg-fisher", {**DP, "noise_multiplier": 0.8, "clipping": "per-group",
                                                      "fisher_batch_size": 8, "fisher_max_batches": 1}, {}),
    "dp-fedavg-distributed": ("dp-fedavg", {**DP, "noise_multiplier": 0.8, "placement": "distributed",
                                            "clipping": "per-group"}, dict(client_fraction=0.7, sampling="poisson")),
    "dp-fedavg-local": ("dp-fedavg", {**DP, "noise_multiplier": 0.8, "placement": "local"}, {}),
    "mm-pfl-adp": ("mm-pfl-adp", {**DP, "target_epsilon": 8.0, "noise_gate": False, "fisher_max_batches": 1,
                                  "fisher_batch_size": 8,
                                  "mask": dict(mode="threshold", threshold=1e-4, update_every=1, hysteresis=0.1)},
                   dict(client_fraction=0.7, sampling="poisson")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vectorized_releases_what_the_loop_engine_releases(uneven_federation, case):
    name, kwargs, changes = CASES[case]
    config = _config(**changes)
    atol = ADAMW_ATOL if config.optimizer.name == "adamw" else ATOL
    loop, vec = _pair(uneven_federation, config, name, kwargs, chunk_size=4)
    row_loop, _ = _assert_same_rounds(loop, vec, 3, atol)
    for site in loop.clients:
        own_loop = loop.strategy.personal_state(site, loop.global_state)
        own_vec = vec.strategy.personal_state(site, vec.global_state)
        assert (own_loop is None) == (own_vec is None)
        for n, value in (own_loop or {}).items():
            torch.testing.assert_close(own_vec[n], value, atol=atol, rtol=1e-4)
    # server-placement DP-FedAvg takes the stacked clip-and-sum release; every other case the per-site hooks
    assert vec._stacked_release == (case in ("dp-fedavg-server", "dp-fedavg-fisher-server"))
    # FedAvg, FedProx (and centralised training, one pooled site) hand their own aggregate one pre-reduced
    # weighted sum; the rest go site by site
    assert vec._stacked_mean == (name in ("fedavg", "fedprox", "centralized"))
    if name.startswith("dp") or name == "mm-pfl-adp":
        assert math.isfinite(row_loop["epsilon"]) and row_loop["epsilon"] > 0
        privacy_loop, privacy_vec = loop.strategy.summary_report()["privacy"], vec.strategy.summary_report()["privacy"]
        assert privacy_vec["epsilon"] == privacy_loop["epsilon"]
    if name == "mm-pfl-adp":  # masks appeared and are the same, so the test exercised the personal split
        masks = loop.strategy.summary_report()["masks"]
        assert any(masks.values()) and vec.strategy.summary_report()["masks"] == masks


def test_chunk_size_does_not_change_the_release(uneven_federation):
    results = []
    for chunk in (1, 2, 5, None):
        _, vec = _pair(uneven_federation, _config(num_rounds=1), "fedavg", {}, chunk_size=chunk)
        vec.strategy.before_round(1)
        vec.run_round(1)
        results.append(vec.global_state)
    for other in results[1:]:
        for name, value in results[0].items():
            torch.testing.assert_close(other[name], value, atol=ATOL, rtol=1e-4)


def test_padding_contributes_zero_gradient_and_a_broken_mask_is_caught(uneven_federation):
    """One chunk of two sites of different sizes vs each site alone: equal. Giving padded rows weight 1
    (the broken mechanism) changes the smaller site's result, so the comparison can fail."""
    model = _factory()
    clients = {s.site_id: __import__("mmpfl_core.data.contract", fromlist=["CohortDataset"]).CohortDataset(s.train)
               for s in uneven_federation.sites}
    pool = _SitePool(clients)
    by_size = sorted(clients, key=lambda s: len(clients[s]))
    small, large = by_size[0], by_size[-1]
    training = LocalTrainingConfig(local_epochs=1, batch_size=64)  # one padded batch per site
    batches = {s: site_batches(len(clients[s]), training, seed=0, round_index=1, site_id=s) for s in (small, large)}
    start = {n: p.detach().unsqueeze(0).expand(2, *p.shape).clone() for n, p in model.named_parameters()}
    opt = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9)
    plan = _plan_chunk([small, large], batches, pool.offset)
    assert plan.weight[0][0].sum() < plan.weight[0].shape[1]  # the small site is padded
    together, _ = train_stacked(model, start, plan, pool, training=training, optimizer=opt, device=torch.device("cpu"))
    alone_plan = _plan_chunk([small], batches, pool.offset)
    alone, _ = train_stacked(model, {n: t[:1] for n, t in start.items()}, alone_plan, pool, training=training,
                             optimizer=opt, device=torch.device("cpu"))
    for n in alone:
        torch.testing.assert_close(together[n][0], alone[n][0], atol=1e-6, rtol=1e-5)
    broken = dataclasses.replace(plan, weight=[torch.ones_like(w) for w in plan.weight])
    wrong, _ = train_stacked(model, start, broken, pool, training=training, optimizer=opt, device=torch.device("cpu"))
    assert max((wrong[n][0] - alone[n][0]).abs().max().item() for n in alone) > 1e-4


@pytest.mark.parametrize("name, kwargs, match", [
    ("ditto", {}, "engine: loop"),
    ("dp-sgd-fedavg", {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "noise": "reproducible-insecure"},
     "engine: loop"),
])
def test_unserved_strategies_are_refused_naming_the_loop_engine(uneven_federation, name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        VectorizedSimulation(uneven_federation, model_factory=_factory, strategy=create_strategy(name, **kwargs),
                             config=_config(engine="vectorized"), progress=False)


def test_models_with_dropout_are_refused(uneven_federation):
    with pytest.raises(ConfigError, match="dropout.*engine: loop"):
        VectorizedSimulation(uneven_federation,
                             model_factory=lambda: create_model("tiny", seed=0, drop_rate=0.1, **SMALL),
                             strategy=create_strategy("fedavg"), config=_config(engine="vectorized"), progress=False)


def test_engine_and_chunk_size_are_validated():
    with pytest.raises(ConfigError, match="engine"):
        FederatedConfig(engine="gpu")
    with pytest.raises(ConfigError, match="chunk_size"):
        FederatedConfig(chunk_size=0)
    assert FederatedConfig.from_dict({"engine": "vectorized", "chunk_size": 64}).engine == "vectorized"


def test_run_directory_and_resume_behave_as_in_the_loop_engine(uneven_federation, tmp_path):
    cfg = _config(num_rounds=3, checkpoint_every=1, eval_every=3, client_fraction=0.7, sampling="poisson",
                  engine="vectorized")

    def strategy():
        return create_strategy("dp-fedavg", **DP, noise_multiplier=1.0)

    whole = run_federated(uneven_federation, model_factory=_factory, strategy=strategy(), config=cfg, progress=False,
                          run_dir=RunDirectory.create(tmp_path, "whole", {}, exist_ok_resume=False))
    run_federated(uneven_federation, model_factory=_factory, strategy=strategy(), config=cfg, progress=False,
                  stop_after=2, run_dir=RunDirectory.create(tmp_path, "cut", {}, exist_ok_resume=False))
    resumed = run_federated(uneven_federation, model_factory=_factory, strategy=strategy(), config=cfg, progress=False,
                            run_dir=RunDirectory.create(tmp_path, "cut", {}, exist_ok_resume=True))
    for name in whole.global_state:
        assert torch.equal(whole.global_state[name], resumed.global_state[name])
    assert resumed.summary["privacy"]["epsilon"] == whole.summary["privacy"]["epsilon"]
    assert (tmp_path / "cut" / "metrics.csv").read_text().count("\n") == 4  # header + 3 rounds, none twice
    loop = run_federated(uneven_federation, model_factory=_factory, strategy=strategy(), progress=False,
                         config=dataclasses.replace(cfg, engine="loop"))
    assert loop.summary["privacy"]["epsilon"] == whole.summary["privacy"]["epsilon"]
    assert set(loop.summary) == set(whole.summary)


@pytest.mark.parametrize("clipping", ["flat", "per-group"])
def test_stacked_clip_and_sum_equals_the_strategys_transmit_and_aggregate(uneven_federation, clipping):
    """The stacked release's clipped sum against the strategy's own per-site transmit (validate, clip
    per group) summed; some updates are far above their bounds, some below. An unclipped sum and a
    flat clip in place of the per-group one (the broken mechanisms) are told apart."""
    _, vec = _pair(uneven_federation, _config(), "dp-fedavg", {**DP, "noise_multiplier": 1.0, "clipping": clipping})
    strategy = vec.strategy
    strategy.before_round(1)
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.001, 0.01, 1.0, 5.0, 0.2])  # ||Delta|| from ~0.01 to ~50 vs C = 0.5
    deltas = {n: scales.view(-1, *[1] * len(shape)) * torch.randn(5, *shape, generator=generator)
              for n, shape in strategy.shapes.items()}
    total, finite = clipped_sum(deltas, strategy.groups, strategy.clip_bounds)
    assert finite
    sent = [strategy.transmit(ClientUpdate(site_id=k, delta={n: d[k] for n, d in deltas.items()}, num_examples=1,
                                           num_steps=1, train_loss=0.0), 1) for k in range(5)]
    for n in strategy.shapes:
        torch.testing.assert_close(total[n], sum(s[n] for s in sent), atol=1e-6, rtol=1e-5)
    unclipped = {n: d.sum(0) for n, d in deltas.items()}
    assert max((unclipped[n] - total[n]).abs().max().item() for n in total) > 1.0
    if clipping == "per-group":
        flat, _ = clipped_sum(deltas, {"all": list(strategy.shapes)}, {"all": strategy.clip_norm})
        assert max((flat[n] - total[n]).abs().max().item() for n in total) > 1e-3
    deltas[next(iter(deltas))][2, 0] = float("nan")
    assert not clipped_sum(deltas, strategy.groups, strategy.clip_bounds)[1]  # -> the per-site path rejects it


def test_cli_engine_flag_runs_the_vectorized_engine_and_refusals_exit_cleanly(tmp_path, capsys):
    import yaml

    from mmpfl_core.cli import main
    config = {"name": "tiny-vec", "data": {"num_subjects": 90, "image_size": 16, "seed": 3},
              "federation": {"num_sites": 4, "alpha": 1.0, "public_size": 0, "seed": 3},
              "model": {"preset": "tiny", "overrides": {"embed_dim": 32, "depth": 1, "patch_size": 8}},
              "federated": {"num_rounds": 1, "local": {"batch_size": 8}, "bootstrap_resamples": 20,
                            "checkpoint_every": 1},
              "methods": [{"strategy": "fedavg"}, {"strategy": "ditto"}]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "r"
    assert main(["train", "--config", str(path), "--method", "fedavg", "--engine", "vectorized", "--out", str(out),
                 "--no-progress"]) == 0
    assert (out / "fedavg" / "metrics.csv").is_file()
    assert json.loads((out / "fedavg" / "config.json").read_text())["config"]["federated"]["engine"] == "vectorized"
    assert main(["train", "--config", str(path), "--method", "ditto", "--engine", "vectorized",
                 "--out", str(tmp_path / "r2"), "--no-progress"]) == 2
    assert "engine: loop" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_chunk_size_follows_memory_and_plans_cut_where_padding_grows(uneven_federation, monkeypatch):
    import mmpfl_core.federated.vectorized as vectorized
    from mmpfl_core.data.contract import CohortDataset
    model = vectorized.explicit_attention_copy(_factory())
    pool = _SitePool({s.site_id: CohortDataset(s.train) for s in uneven_federation.sites})
    training = LocalTrainingConfig(batch_size=16)
    cpu = torch.device("cpu")
    monkeypatch.setattr(vectorized, "available_memory_bytes", lambda device: 2**40)
    assert vectorized.auto_chunk_size(model, pool, training, cpu) == vectorized.MAX_AUTO_CHUNK
    monkeypatch.setattr(vectorized, "available_memory_bytes", lambda device: 4 * 2**20)
    small = vectorized.auto_chunk_size(model, pool, training, cpu)
    assert 1 <= small < vectorized.MAX_AUTO_CHUNK  # 1 MiB for a chunk: a handful of sites
    params = sum(p.numel() * 4 for p in model.parameters())
    assert small * 6 * params <= 2**20
    # sorted schedules with first batches of 2, 2, 2, 8, 8 examples: cut before the 8s (padding > 30%) ...
    batches = {s: [torch.arange(n)] for s, n in enumerate([2, 2, 2, 8, 8])}
    assert vectorized.plan_chunks(list(batches), batches, 16, min_sites=2) == [[0, 1, 2], [3, 4]]
    # ... and at chunk_size; a chunk below min_sites takes the next site whatever its padding
    assert vectorized.plan_chunks(list(batches), batches, 2, min_sites=2) == [[0, 1], [2, 3], [4]]


def test_a_site_without_training_examples_sends_a_zero_update_in_both_engines(uneven_federation):
    sites = list(uneven_federation.sites)
    sites[1] = dataclasses.replace(sites[1], train=sites[1].train.subset(np.zeros(0, dtype=np.int64)))
    federation = dataclasses.replace(uneven_federation, sites=tuple(sites))
    loop, vec = _pair(federation, _config(num_rounds=2), "dp-fedavg", {**DP, "noise_multiplier": 0.5}, chunk_size=4)
    _assert_same_rounds(loop, vec, 2)


@pytest.mark.parametrize("optimizer", [OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.05),
                                       OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01)])
def test_closed_form_first_step_equals_the_optimizers_step_from_zero_state(optimizer):
    """The first step in closed form (-lr wd theta - lr g / (|g| + eps) for AdamW) against the stacked
    optimiser's own first step, for a shared and a per-site start; a step that forgets the weight decay
    or AdamW's normalisation (the broken variants) is told apart."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 3), "b": (4,)}
    start = {n: torch.randn(*shape, generator=generator) for n, shape in shapes.items()}
    grads = {n: torch.randn(5, *shape, generator=generator) * 10.0 ** torch.arange(-6, -1).view(-1, *[1] * len(shape))
             for n, shape in shapes.items()}  # gradients from 1e-6 to 1e-2: |g| near eps is in range
    stacked = {n: t.expand(5, *t.shape).clone() for n, t in start.items()}
    reference = _StackedOptimizer(optimizer, {n: t.clone() for n, t in stacked.items()})
    stepped = reference.step({n: t.clone() for n, t in stacked.items()}, grads, None)
    for begin in (start, stacked):  # shared (unbatched) and per-site starts
        delta, state = _StackedOptimizer.first_step(optimizer, begin, grads, keep_state=True)
        for n in shapes:
            torch.testing.assert_close(stacked[n] + delta[n], stepped[n], atol=1e-6, rtol=1e-5)
            for mine, theirs in zip(state.get(n, []), reference.state.get(n, []), strict=True):
                torch.testing.assert_close(mine, theirs, atol=1e-9, rtol=1e-5)
    no_decay = dataclasses.replace(optimizer, weight_decay=0.0)
    wrong, _ = _StackedOptimizer.first_step(no_decay, start, grads, keep_state=False)
    assert max((stacked[n] + wrong[n] - stepped[n]).abs().max().item() for n in shapes) > 1e-6
    if optimizer.name == "adamw":
        raw = {n: -optimizer.lr * (g + optimizer.weight_decay * start[n]) for n, g in grads.items()}  # no 1/|g|
        assert max((stacked[n] + raw[n] - stepped[n]).abs().max().item() for n in shapes) > 1e-4


def test_a_shared_start_gives_what_per_site_copies_of_it_give(uneven_federation):
    """Step 1 with the global model entering vmap unbatched (one forward over all examples, per-site
    weight gradients) against the same start copied per site (the batched path), over two local steps."""
    model = _factory()
    clients = {s.site_id: __import__("mmpfl_core.data.contract", fromlist=["CohortDataset"]).CohortDataset(s.train)
               for s in uneven_federation.sites}
    pool = _SitePool(clients)
    training = LocalTrainingConfig(local_epochs=1, batch_size=8)
    sites = sorted(clients)
    batches = {s: site_batches(len(clients[s]), training, seed=0, round_index=1, site_id=s) for s in sites}
    plan = _plan_chunk(sites, batches, pool.offset)
    assert len(plan.index) > 1  # more than one step: the closed-form first step hands over its state
    shared = {n: p.detach().clone() for n, p in model.named_parameters()}
    copies = {n: p.unsqueeze(0).expand(len(sites), *p.shape).clone() for n, p in shared.items()}
    cpu = torch.device("cpu")
    for opt in (ADAMW, OptimizerConfig(name="sgd", lr=0.05, momentum=0.9)):
        a, loss_a = train_stacked(model, shared, plan, pool, training=training, optimizer=opt, device=cpu)
        b, loss_b = train_stacked(model, copies, plan, pool, training=training, optimizer=opt, device=cpu)
        atol = ADAMW_ATOL if opt.name == "adamw" else 1e-6
        for n in a:
            torch.testing.assert_close(a[n], b[n], atol=atol, rtol=1e-4)
        torch.testing.assert_close(loss_a, loss_b)


# The regime map's model since the regime run moved to it: a conv stem (two 3x3 stride-2 convolutions,
# GroupNorm) and one block at 16 px, configs/reproduce_regime.yaml.
HYBRID = dict(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, stem_channels=8)


@pytest.mark.parametrize("model", ["tiny", "hybrid-tiny"])
@pytest.mark.parametrize("case", ["fedavg", "dp-fedavg-server", "mm-pfl-adp"])
def test_every_sites_update_is_the_loop_engines_and_a_row_mix_up_is_caught(uneven_federation, monkeypatch, model,
                                                                           case):
    """Site by site, the update the vectorised engine hands the strategy (a lazy row of the chunk's
    stacked result, :class:`_StackedRow`) equals the loop engine's, on the linear-patch model and on the
    regime map's conv-stem model. The stacked releases (FedAvg's weighted sum, DP-FedAvg's clipped
    sum) never read a site's row, so the released-model tests above cannot see rows handed to the wrong
    site; this test does: a variant that hands site k the row of site k + 1 is told apart."""
    import mmpfl_core.federated.vectorized as vectorized

    name, kwargs, changes = CASES[case]
    config = _config(**changes)

    def factory():
        return create_model(model, seed=0, **(SMALL if model == "tiny" else HYBRID))

    def run(broken: bool) -> float:
        loop = FederatedSimulation(uneven_federation, model_factory=factory,
                                   strategy=create_strategy(name, **kwargs), config=config, progress=False)
        vec = VectorizedSimulation(uneven_federation, model_factory=factory,
                                   strategy=create_strategy(name, **kwargs),
                                   config=dataclasses.replace(config, engine="vectorized", chunk_size=4),
                                   progress=False)
        selected = sorted(loop.clients)
        for sim in (loop, vec):
            sim.strategy.before_round(1)
        with monkeypatch.context() as patch:
            if broken:
                honest = vectorized._stacked_rows
                patch.setattr(vectorized, "_stacked_rows",
                              lambda stacked, n: [honest(stacked, n)[(k + 1) % n] for k in range(n)])
            vec_updates, _ = vec.train_clients(selected, 1)
        loop_updates, _ = loop.train_clients(selected, 1)
        assert [u.site_id for u in vec_updates] == [u.site_id for u in loop_updates] == selected
        gap = 0.0
        for mine, theirs in zip(vec_updates, loop_updates, strict=True):
            assert set(mine.delta) == set(theirs.delta)
            assert (mine.num_examples, mine.num_steps) == (theirs.num_examples, theirs.num_steps)
            assert mine.train_loss == pytest.approx(theirs.train_loss, rel=1e-4)
            gap = max(gap, max((mine.delta[n] - theirs.delta[n]).abs().max().item() for n in theirs.delta))
        return gap

    assert run(broken=False) <= ATOL
    assert run(broken=True) > 100 * ATOL
