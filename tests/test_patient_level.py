"""Patient-level private baselines (local-dp-sgd, mr-mtl), DP-SGD with a post-noise regulariser, and the
public pretraining stage (mmpfl_core.pretraining)."""

from __future__ import annotations

import math

import pytest
import torch

from mmpfl_core.data.contract import CohortDataset
from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.client import local_update
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.models.presets import create_model
from mmpfl_core.pretraining import (
    PRIVATE_PARTS,
    pretrain_public_model,
    pretrained_model_factory,
    private_dimension,
    public_cohort,
    restrict_trainable,
)
from mmpfl_core.privacy import compute_epsilon
from mmpfl_core.privacy.dp_sgd import PrivateTraining
from mmpfl_core.centralized import TrainingRecipe

CFG = FederatedConfig(
    num_rounds=2,
    local=LocalTrainingConfig(local_steps=2, batch_size=16),
    optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.0, weight_decay=0.0),
    bootstrap_resamples=0,
    checkpoint_every=0,
    device="cpu",
    client_fraction=1.0,
)
INSECURE = dict(noise="reproducible-insecure")


def _run(federation, factory, name, **kwargs):
    with (
        pytest.warns(UserWarning)
        if kwargs.get("sample_level_dp", {}).get("noise") == "reproducible-insecure"
        else _nothing()
    ):
        strategy = create_strategy(name, **kwargs)
    return run_federated(federation, model_factory=factory, strategy=strategy, config=CFG, progress=False), strategy


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_dp_sgd_adds_the_regulariser_after_the_noise(tiny_federation, tiny_model_factory):
    """With a vanishing clip bound the patients' gradient is ~0, so what moves the parameters is the
    regulariser alone: lr * lam * (p - anchor). A regulariser clipped with the patients (the wrong order)
    would move them by at most lr * C."""
    model = tiny_model_factory()
    anchor = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lam, lr = 0.5, 0.1

    def pull(m):
        return 0.5 * lam * torch.stack([((p - anchor[n]) ** 2).sum() for n, p in m.named_parameters()]).sum()

    training = PrivateTraining(
        noise_multiplier=0.0, max_grad_norm=1e-9, sample_rate=0.5, expected_batch_size=8, secret_randomness=False
    )
    data = CohortDataset(tiny_federation.sites[0].train)
    local_update(
        model,
        data,
        site_id=0,
        training=LocalTrainingConfig(local_steps=1, batch_size=16),
        optimizer=OptimizerConfig(name="sgd", lr=lr, momentum=0.0, weight_decay=0.0),
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        regulariser=pull,
        private_training=training,
    )
    for n, p in model.named_parameters():
        # one SGD step on lam/2 ||p - a||^2 moves p by lr * lam * (a - p) = +0.05 per coordinate
        assert torch.allclose(p.detach() - before[n], torch.full_like(p, lr * lam), atol=1e-6), n


def test_mr_mtl_with_lam_zero_is_local_training(tiny_federation, tiny_model_factory):
    local, _ = _run(tiny_federation, tiny_model_factory, "local")
    mr, strategy = _run(tiny_federation, tiny_model_factory, "mr-mtl", lam=0.0)
    for site in tiny_federation.sites:
        own, theirs = local.strategy.personal_state(site.site_id, {}), strategy.personal_state(site.site_id, {})
        for n in own:
            assert torch.allclose(own[n], theirs[n], atol=1e-6), (site.site_id, n)


def test_mr_mtl_mean_is_the_uniform_mean_of_personal_models(tiny_federation, tiny_model_factory):
    run, strategy = _run(tiny_federation, tiny_model_factory, "mr-mtl", lam=1.0)
    personal = [strategy.personal_state(s.site_id, {}) for s in tiny_federation.sites]
    for n, w in run.global_state.items():
        mean = torch.stack([p[n] for p in personal]).mean(0)
        assert torch.allclose(w, mean, atol=1e-5), n  # q = 1: w_{t+1} = mean_k v_k, not weighted by n_k


def test_mr_mtl_pull_moves_personal_models_towards_each_other(tiny_federation, tiny_model_factory):
    def spread(strategy):
        personal = [strategy.personal_state(s.site_id, {}) for s in tiny_federation.sites]
        return sum(float(torch.stack([p[n] for p in personal]).var(0).sum()) for n in personal[0])

    _, free = _run(tiny_federation, tiny_model_factory, "mr-mtl", lam=0.0)
    _, pulled = _run(tiny_federation, tiny_model_factory, "mr-mtl", lam=5.0)
    assert spread(pulled) < spread(free)


@pytest.mark.parametrize("name,kwargs", [("local-dp-sgd", {}), ("mr-mtl", {"lam": 1.0})])
def test_patient_level_baselines_charge_each_site_its_dp_sgd_steps(tiny_federation, tiny_model_factory, name, kwargs):
    run, strategy = _run(
        tiny_federation,
        tiny_model_factory,
        name,
        sample_level_dp=dict(noise_multiplier=1.1, max_grad_norm=1.0, accountant="rdp", **INSECURE),
        **kwargs,
    )
    summary = run.summary["sample_level_privacy"]
    assert run.summary["privacy_unit"].startswith("patient")
    for site in tiny_federation.sites:
        n = len(site.train)
        expected = compute_epsilon(
            noise_multiplier=1.1, sample_rate=16 / n, steps=2 * CFG.num_rounds, delta=1e-5, accountant="rdp"
        )
        assert summary["per_site_epsilon"][site.site_id] == pytest.approx(expected)
    if name == "local-dp-sgd":
        assert run.summary["megabytes_up"] == 0 and run.summary["megabytes_down"] == 0
        first = tiny_model_factory()
        moved = [
            not torch.equal(strategy.personal_state(s.site_id, {})[n], p.detach())
            for s in tiny_federation.sites
            for n, p in first.named_parameters()
        ]
        assert any(moved)


def test_local_dp_sgd_needs_its_budget():
    with pytest.raises(ConfigError, match="sample_level_dp"):
        create_strategy("local-dp-sgd")
    with pytest.raises(ConfigError, match="lam"):
        create_strategy("mr-mtl", lam=-1.0)


# ------------------------------------------------------------------ public pretraining
def test_private_part_sets_the_dimension_the_engines_noise(tiny_federation):
    model = create_model("hybrid-tiny", seed=0)
    sizes = model.group_sizes()
    assert restrict_trainable(model, "head") == sizes["head"] == 195
    assert restrict_trainable(model, "head+norm") == sizes["head"] + sizes["norm"]
    assert restrict_trainable(model, "all") == sum(sizes.values()) == private_dimension(model)
    restrict_trainable(model, "head")
    strategy = create_strategy("dp-fedavg", noise_multiplier=1.0, clipping="per-group")
    strategy.configure(config=CFG, federation=tiny_federation, client_ids=[0, 1, 2], model=model)
    assert sum(strategy.group_sizes.values()) == 195  # only the private part is clipped, noised and sent
    with pytest.raises(ConfigError, match="unknown"):
        restrict_trainable(model, "nonsense")
    with pytest.raises(ConfigError, match="unknown parameter groups"):
        restrict_trainable(model, ["head", "adapter"])
    assert set(PRIVATE_PARTS) >= {"head", "all"}


def test_private_part_head_norm_block_is_the_last_transformer_block():
    model = create_model("hybrid-tiny", seed=0)
    sizes = model.group_sizes()
    last = max((g for g in sizes if g.startswith("block.")), key=lambda g: int(g.split(".")[1]))
    assert last == "block.1"  # hybrid-tiny has depth 2
    assert restrict_trainable(model, "head+norm+block") == sizes[last] + sizes["norm"] + sizes["head"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    groups = model.parameter_groups()
    assert trainable == set(groups[last]) | set(groups["norm"]) | set(groups["head"])
    assert not trainable & set(groups["block.0"])  # the earlier block stays public (frozen)


def test_lesion_contrast_is_a_domain_knob_that_leaves_the_reference_cohort_unchanged():
    from mmpfl_core.data.synthetic import TISSUE_LABELS, SyntheticCohortConfig, generate_subjects

    ref, tissue = generate_subjects(
        SyntheticCohortConfig(num_subjects=24, image_size=32, seed=5), return_tissue_maps=True
    )
    same = generate_subjects(SyntheticCohortConfig(num_subjects=24, image_size=32, seed=5, lesion_contrast=1.0))
    assert (ref.images == same.images).all()  # the default is bit-identical to the reference cohort
    faint = generate_subjects(SyntheticCohortConfig(num_subjects=24, image_size=32, seed=5, lesion_contrast=0.4))
    assert (faint.labels == ref.labels).all() and (faint.lesion_masks == ref.lesion_masks).all()  # same patients
    lesion, wm = tissue == TISSUE_LABELS["lesion"], tissue == TISSUE_LABELS["wm"]
    flair = 2  # MODALITIES order T1, T2, FLAIR: lesions are FLAIR-bright

    def contrast(images):
        return images[:, flair][lesion].mean() - images[:, flair][wm].mean()

    assert 0 < contrast(faint.images) < 0.6 * contrast(ref.images)  # fainter, still hyperintense
    with pytest.raises(ConfigError, match="lesion_contrast"):
        SyntheticCohortConfig(lesion_contrast=0.0)


def test_public_cohort_is_public_and_new():
    cohort = public_cohort(40, image_size=16, seed=123)
    assert len(cohort) == 40 and (cohort.sites == -1).all()
    other = public_cohort(40, image_size=16, seed=124)
    assert not torch.equal(torch.from_numpy(cohort.images), torch.from_numpy(other.images))
    with pytest.raises(ConfigError, match="own"):
        public_cohort(40, image_size=16, seed=1, forbidden_seeds=[1])


def test_pretraining_refuses_site_data_and_the_factory_freezes_the_public_part(tiny_federation):
    def base():
        return create_model("tiny", seed=0, image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)

    with pytest.raises(ConfigError, match="site"):
        pretrain_public_model(base(), tiny_federation.sites[0].train, TrainingRecipe(epochs=1, warmup_epochs=0))
    model = base()
    pretrain_public_model(model, public_cohort(60, image_size=32, seed=77), TrainingRecipe(epochs=1, warmup_epochs=0))
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not all(torch.equal(state[n], p.detach()) for n, p in base().named_parameters())  # it trained
    factory = pretrained_model_factory(base, state, "head")
    built = factory()
    assert all(torch.equal(p.detach(), state[n]) for n, p in built.named_parameters())
    assert {n for n, p in built.named_parameters() if p.requires_grad} == set(built.parameter_groups()["head"])
    assert math.isclose(private_dimension(built), built.group_sizes()["head"])


def test_where_collaboration_pays_bench_runs_and_reports_every_arm(tmp_path, monkeypatch):
    """The bench's plumbing at smoke size: pretraining cache, arms in worker processes, the table, and the
    headline preset's MM-PFL-ADP arm keeping its head personal and sharing some of the rest (its release)."""
    import importlib
    import sys
    from pathlib import Path

    import pandas as pd

    monkeypatch.setenv("MMPFL_BENCH_RESULTS", str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    sys.modules.pop("where_collaboration_pays", None)
    bench = importlib.import_module("where_collaboration_pays")
    arms = ["public-model-only", "scratch/local", "public/mm-pfl-adp-head"]
    bench.main(["--quick", "--preset", "headline", "--seeds", "0", "--workers", "1", "--arms", *arms]
               + ["--set", "rounds=1", "num_sites=3"])  # fmt: skip
    table = pd.read_csv(tmp_path / "where_collaboration_pays.csv").set_index("arm")
    assert set(table.index) == set(arms)
    # the kit's public stage (experiment.public_pretrained_state), cached once and reused by the arms
    assert len(list((tmp_path / ".cache").rglob("public_model-*.json"))) == 1
    d = int(table.loc["public/mm-pfl-adp-head", "d"])
    assert d == 50_307  # head+norm+block of hybrid-tiny
    # the head is personal at every site; the KL masks keep at least one group shared (min_shared_groups=1)
    assert 0 < table.loc["public/mm-pfl-adp-head", "shared_d"] <= d - 195
    assert table.loc["scratch/local", "shared_d"] == 0  # local training releases nothing
    # the per-group DP-SGD arms pass group_allocation through sample_level_dp to the strategy (run in-process
    # on the same smoke Setting, the pretrained model from the cache above)
    import mmpfl_core.federated.strategies as strategies

    seen, real = [], strategies.create_strategy
    monkeypatch.setattr(strategies, "create_strategy", lambda name, **kw: seen.append(kw) or real(name, **kw))
    quick = {"num_subjects": 300, "public_subjects": 60, "public_epochs": 1, "image_size": 32}
    s = bench.replace(bench.HEADLINE, rounds=1, num_sites=3, **quick)
    out = bench.run_arm("public/mm-pfl-adp-head+group-dp-sgd-uniform", 0, s, str(tmp_path / ".cache"))
    assert seen[-1]["sample_level_dp"]["group_allocation"] == "uniform"
    assert 0 < out["epsilon"] <= s.epsilon  # from the per-site DP-SGD ledger


@pytest.mark.parametrize("name,kwargs", [("mm-pfl-adp", {"dp": False}), ("dp-fedavg", {"noise_multiplier": 1.0})])
def test_engines_train_and_send_only_the_private_part(tiny_federation, name, kwargs):
    def base():
        return create_model("tiny", seed=0, image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)

    public = {n: p.detach().clone() for n, p in base().named_parameters()}
    factory = pretrained_model_factory(base, public, "head+norm")
    with pytest.warns(UserWarning) if "noise_multiplier" in kwargs else _nothing():
        strategy = (
            create_strategy(name, noise="reproducible-insecure", **kwargs)
            if "noise_multiplier" in kwargs
            else create_strategy(name, **kwargs)
        )
    run = run_federated(tiny_federation, model_factory=factory, strategy=strategy, config=CFG, progress=False)
    private = set(factory().parameter_groups()["head"]) | set(factory().parameter_groups()["norm"])
    assert set(run.global_state) == private  # only the private part is exchanged
    for site in tiny_federation.sites:
        deployed = strategy.personal_state(site.site_id, run.global_state) or run.global_state
        assert set(deployed) <= private
