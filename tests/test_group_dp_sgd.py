"""Per-group DP-SGD (privacy/group_dp_sgd.py) and its use by MM-PFL-ADP under patient-level DP.

Each guarantee is tested the way it would break: the realised noise has the accounted z_eff, every
clipped per-sample group stays within C_g, the allocation does not move when a private patient is
removed (and does when a variant computes the Fisher on a site's patients), a distinguishing test
flags a variant without per-group clipping and not the real optimiser, and the epsilon reported is
the accountant's for z_eff.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

import mmpfl_core.federated.dp_fisher as dp_fisher_module
import mmpfl_core.federated.strategies as strategies_module  # Strategy.local_training calls local_update there
from mmpfl_core.attacks.distinguishing import distinguishing_lower_bound
from mmpfl_core.data.contract import CohortDataset
from mmpfl_core.errors import ConfigError, PrivacyError
from mmpfl_core.federated.client import ClientUpdate
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.mm_pfl_adp import MMPFLADP
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.personalization.noise_gate import NoiseGate
from mmpfl_core.privacy import compute_epsilon, fisher_noise_allocation, uniform_noise_allocation
from mmpfl_core.privacy import group_dp_sgd
from mmpfl_core.privacy.allocation import clip_bounds_from_sizes, effective_multiplier
from mmpfl_core.privacy.dp_sgd import PrivateTraining, make_private
from mmpfl_core.privacy.group_dp_sgd import GroupNoise, patients_per_noise, plan_group_dp_sgd

# Opacus' hooks on a model whose inputs need no gradient (harmless here)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

CONFIG = FederatedConfig(num_rounds=2, local=LocalTrainingConfig(local_steps=2, batch_size=16),
                         optimizer=OptimizerConfig(lr=3e-3), bootstrap_resamples=0, checkpoint_every=0, device="cpu")


def _adp(allocation: str = "fisher", **kw) -> MMPFLADP:
    sample = dict(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", group_allocation=allocation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reproducible-insecure noise warns (on purpose)
        return MMPFLADP(dp=False, fisher_max_batches=1, fisher_batch_size=8, noise="reproducible-insecure",
                        sample_level_dp=sample, **kw)


def _run(strategy, federation, factory, config=CONFIG):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return run_federated(federation, model_factory=factory, strategy=strategy, config=config, progress=False)


# ---- a two-group model whose per-sample gradients are the inputs: group a = x[:, :2], group b = x[:, 2:]
class TwoGroups(nn.Module):
    def __init__(self, d_a: int = 2, d_b: int = 200) -> None:
        super().__init__()
        self.d_a = d_a
        self.a, self.b = nn.Linear(d_a, 1, bias=False), nn.Linear(d_b, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, : self.d_a]) + self.b(x[:, self.d_a:])

    def parameter_groups(self) -> dict[str, list[str]]:
        return {"a": ["a.weight"], "b": ["b.weight"]}


def _group_noise(model: TwoGroups, z: float, fisher: dict[str, float] | None = None, ratio=None) -> GroupNoise:
    sizes = {"a": model.a.weight.numel(), "b": model.b.weight.numel()}
    plan = plan_group_dp_sgd(allocation="uniform" if fisher is None else "fisher", groups=model.parameter_groups(),
                             group_sizes=sizes, max_grad_norm=1.0, fisher=fisher, max_noise_ratio=ratio)
    return plan.noise_for(z)


def _optimizer(model, noise: GroupNoise, batch: int, seed: int = 0, secure: bool = False):
    training = PrivateTraining(noise_multiplier=noise.noise_multiplier, max_grad_norm=1.0, sample_rate=1.0,
                               expected_batch_size=batch, secret_randomness=secure, group_noise=noise)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    generator = None if secure else torch.Generator().manual_seed(seed)
    return make_private(module=model, optimizer=opt, training=training, generator=generator)


def _noisy_sum(wrapped, opt, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One DP-SGD step's noisy SUM per parameter (p.grad times B: Opacus divides by the expected batch)."""
    opt.zero_grad(set_to_none=True)
    if len(x) == 0:  # as the client does for an empty Poisson batch
        for p in opt.params:
            p.grad_sample = torch.zeros((0, *p.shape))
    else:
        wrapped(x).mean().backward()
    assert opt.pre_step()
    return {n: p.grad.detach().clone() * opt.expected_batch_size for n, p in wrapped._module.named_parameters()}


# ---- the plan reuses the client-level allocation; z_eff exact
def test_plan_is_the_client_level_allocation_with_exact_z_eff():
    groups = {"x": ["x.w"], "y": ["y.w", "y.b"], "z": ["z.w"]}
    sizes, fisher = {"x": 10, "y": 300, "z": 40}, {"x": 5.0, "y": 0.01, "z": 1.0}
    bounds = clip_bounds_from_sizes(sizes, 2.0)
    for z in (0.7, 1.3):
        noise = plan_group_dp_sgd(allocation="fisher", groups=groups, group_sizes=sizes, max_grad_norm=2.0,
                                  fisher=fisher, max_noise_ratio=2.0).noise_for(z)
        expected = fisher_noise_allocation(group_sizes=sizes, fisher=fisher, clip_bounds=bounds, noise_multiplier=z,
                                           max_noise_ratio=2.0)
        assert dict(noise.sigmas) == dict(expected.sigmas) and dict(noise.clip_bounds) == bounds
        assert effective_multiplier(noise.clip_bounds, noise.sigmas) == pytest.approx(z, rel=1e-9)
        assert len(set(noise.sigmas.values())) > 1  # the Fisher split is not uniform here
        uniform = plan_group_dp_sgd(allocation="uniform", groups=groups, group_sizes=sizes, max_grad_norm=2.0
                                    ).noise_for(z)
        assert dict(uniform.sigmas) == dict(uniform_noise_allocation(group_sizes=sizes, clip_bounds=bounds,
                                                                     noise_multiplier=z).sigmas)
        assert all(s == pytest.approx(2.0 * z) for s in uniform.sigmas.values())
    # settings whose realised z_eff is not the accounted multiplier are refused
    bad = dict(noise.sigmas, x=noise.sigmas["x"] * 0.99)
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        GroupNoise(groups=noise.groups, clip_bounds=noise.clip_bounds, sigmas=bad, noise_multiplier=1.3,
                   allocation="fisher")
    with pytest.raises(ConfigError, match="unknown"):
        plan_group_dp_sgd(allocation="layerwise", groups=groups, group_sizes=sizes, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="Fisher"):
        plan_group_dp_sgd(allocation="fisher", groups=groups, group_sizes=sizes, max_grad_norm=1.0)


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
def test_realised_noise_has_the_accounted_effective_multiplier(secure):
    """Empty batches: the step releases noise only. Measured std per group vs sigma_g, and z_eff of the
    measured stds (sum_g C_g^2 / sigma_hat_g^2)^(-1/2) vs the accounted z."""
    model = TwoGroups(d_a=20, d_b=60)
    noise = _group_noise(model, z=1.7, fisher={"a": 50.0, "b": 1.0}, ratio=None)
    assert noise.sigmas["a"] < noise.sigmas["b"]  # a non-trivial split
    wrapped, opt = _optimizer(model, noise, batch=8, secure=secure)
    draws = 300
    energy = {"a": 0.0, "b": 0.0}
    for _ in range(draws):
        sums = _noisy_sum(wrapped, opt, torch.zeros(0, 80))
        energy["a"] += float(sums["a.weight"].pow(2).sum())
        energy["b"] += float(sums["b.weight"].pow(2).sum())
    wrapped._close()
    measured = {g: math.sqrt(energy[g] / (draws * d)) for g, d in (("a", 20), ("b", 60))}
    for g in ("a", "b"):  # 6,000 / 18,000 squares: the std estimate is within ~2 %
        assert measured[g] == pytest.approx(noise.sigmas[g], rel=0.05)
    z_hat = effective_multiplier(noise.clip_bounds, measured)
    assert z_hat == pytest.approx(1.7, rel=0.05)
    assert group_dp_sgd.realised_effective_multiplier(noise) == pytest.approx(1.7, rel=1e-9)


def test_every_clipped_per_sample_group_is_within_its_bound():
    """One sample at a time with negligible noise, the released sum IS the clipped per-sample gradient: its
    part in group g has norm <= C_g, = C_g where the raw part was larger; a batch's sum is the sum of the
    clipped samples (clipping is per sample). Opacus' flat clipping, the control, breaks the group bound."""
    torch.manual_seed(0)
    model = TwoGroups(d_a=2, d_b=200)
    noise = _group_noise(model, z=1e-9)
    bounds = noise.clip_bounds
    x = torch.randn(6, 202)
    x[:3, :2] *= 100.0  # large parts in the small group a (raw norm >> C_a)
    x[3:, 2:] *= 0.001  # and small parts in b (left as they are)
    wrapped, opt = _optimizer(model, noise, batch=1)
    clipped = []
    for i in range(len(x)):
        sums = _noisy_sum(wrapped, opt, x[i:i + 1])
        parts = {"a": sums["a.weight"], "b": sums["b.weight"]}
        raw = {"a": x[i, :2], "b": x[i, 2:]}  # d(mean output)/dW = the input
        for g in ("a", "b"):
            norm, raw_norm = float(parts[g].norm()), float(raw[g].norm())
            assert norm <= bounds[g] * (1 + 1e-6)
            assert norm == pytest.approx(min(raw_norm, bounds[g]), rel=1e-4, abs=1e-7)
        clipped.append(parts)
    wrapped._close()
    wrapped, opt = _optimizer(model, noise, batch=len(x))
    batch = _noisy_sum(wrapped, opt, x)
    wrapped._close()
    assert torch.allclose(batch["a.weight"], sum(c["a"] for c in clipped), atol=1e-5)
    assert torch.allclose(batch["b.weight"], sum(c["b"] for c in clipped), atol=1e-5)
    # control: flat clipping to C leaves a sample's group-a part far above C_a
    flat = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0,
                       expected_batch_size=1)
    from opacus import GradSampleModule
    gsm = GradSampleModule(model)
    flat.zero_grad(set_to_none=True)
    gsm(x[:1]).mean().backward()
    flat.pre_step()
    assert float(model.a.weight.grad.norm()) > 3 * bounds["a"]
    gsm._close()


def test_a_parameter_outside_every_group_is_refused():
    model = TwoGroups()
    noise = _group_noise(model, z=1.0)
    partial = GroupNoise(groups={"a": ("a.weight",)}, clip_bounds={"a": 1.0}, sigmas={"a": 1.0},
                         noise_multiplier=1.0, allocation="uniform")
    with pytest.raises(PrivacyError, match="b.weight"):
        _optimizer(model, partial, batch=4)
    with pytest.raises(ConfigError, match="z_eff"):
        training = PrivateTraining(noise_multiplier=2.0, max_grad_norm=1.0, sample_rate=1.0, expected_batch_size=4,
                                   secret_randomness=False, group_noise=noise)
        make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), training=training,
                     generator=torch.Generator())


# ---- distinguishing: the real optimiser vs one without per-group clipping
class _FlatClipped:
    """Broken variant: the per-group noise of the allocation, but Opacus' flat clipping to C (no group bounds)."""

    def clip_and_accumulate(self):
        DPOptimizer.clip_and_accumulate(self)


def _statistics(opt_class, x0: torch.Tensor, x1: torch.Tensor, runs: int) -> tuple[np.ndarray, np.ndarray]:
    """T = the released noisy sum of group a along the canary's direction e_1, over ``runs`` steps per world."""
    model = TwoGroups(d_a=2, d_b=200)
    noise = _group_noise(model, z=3.0, fisher={"a": 1e6, "b": 1.0}, ratio=None)
    out = []
    for world, x in enumerate((x0, x1)):
        wrapped, opt = _optimizer(model, noise, batch=len(x0), seed=world)
        opt.__class__ = opt_class(opt.__class__)
        out.append(np.array([float(_noisy_sum(wrapped, opt, x)["a.weight"][0, 0]) for _ in range(runs)]))
        wrapped._close()
    return out[0], out[1]


def test_distinguishing_flags_flat_clipping_with_per_group_noise_and_not_the_real_optimiser():
    """D1 = D0 + a canary whose gradient lies in the low-noise group a with norm >> C. One step, q = 1, z = 3:
    the accountant's epsilon (z_eff = 3) bounds what a threshold test on T can prove for the real optimiser;
    without per-group clipping the canary moves T by C / sigma_a ~ 3 noise stds and the bound is exceeded."""
    torch.manual_seed(1)
    x0 = torch.randn(3, 202) * 0.1
    x0[:, 0] = 0.0  # the other patients have nothing along e_1 in group a
    canary = torch.zeros(1, 202)
    canary[0, 0] = 1e3
    x1 = torch.cat([x0, canary])
    x0 = torch.cat([x0, torch.zeros(1, 202)])  # same batch shape: a patient with zero gradient (no effect)
    claimed = compute_epsilon(noise_multiplier=3.0, sample_rate=1.0, steps=1, delta=1e-5, accountant="rdp")

    def bound(opt_class, variant):
        t0, t1 = _statistics(opt_class, x0, x1, runs=2000)
        return distinguishing_lower_bound(t0, t1, delta=1e-5, rng=np.random.default_rng(0), claimed_epsilon=claimed,
                                          variant=variant).epsilon_lower_bound

    broken = bound(lambda cls: type("FlatClipped", (_FlatClipped, cls), {}), "flat-clipping")
    correct = bound(lambda cls: cls, "correct")
    assert broken > claimed, f"flat clipping with per-group noise was not flagged ({broken:.2f} <= {claimed:.2f})"
    assert correct <= claimed


# ---- the allocation comes from public data only
class FisherOnSiteData(MMPFLADP):
    """Broken variant: the Fisher of the allocation computed on site 0's training patients."""

    def configure(self, *, config, federation, client_ids, model):
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)
        self._public = CohortDataset(federation.sites[0].train)


def _pin_training(monkeypatch):
    """Local training replaced by a fixed, data-independent update (the DP-SGD output held fixed)."""
    def pinned(model, dataset, *, site_id, training, optimizer, generator, device, regulariser=None,
               private_training=None):
        assert private_training is not None and private_training.group_noise is not None
        delta = {n: 0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(site_id))
                 for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in delta:
                    p.add_(delta[n])
        return ClientUpdate(site_id=site_id, delta=delta, num_examples=0, num_steps=2, train_loss=0.0)
    monkeypatch.setattr(strategies_module, "local_update", pinned)


def _plans(strategy, federation, factory):
    log, plan = [], strategy.plan_group_dp_sgd

    def spy(**kw):
        drowned = plan(**kw)
        log.append((dict(strategy.group_dp_plan.fisher), dict(strategy.group_dp_plan.unit.sigmas), drowned))
        return drowned
    strategy.plan_group_dp_sgd = spy
    _run(strategy, federation, factory)
    return log


def test_the_allocation_is_bit_identical_without_a_private_patient(tiny_federation, tiny_model_factory,
                                                                   monkeypatch):
    """Removing a training patient of site 0 leaves every round's Fisher, sigma_g / z and drowned set
    bit-identical (training pinned, so the released models are equal too); the variant that computes the
    Fisher on site 0's patients is flagged by the same comparison. Every Fisher sample is a public one."""
    _pin_training(monkeypatch)
    site = tiny_federation.sites[0]
    neighbour = dataclasses.replace(tiny_federation, sites=(
        dataclasses.replace(site, train=site.train.subset(np.arange(1, len(site.train)))),
        *tiny_federation.sites[1:]))
    seen: list[torch.Tensor] = []
    original = dp_fisher_module.diagonal_fisher

    def spy(model, batches, **kw):
        batches = list(batches)
        seen.extend(inputs[0] for inputs, _ in batches)
        return original(model, iter(batches), **kw)
    monkeypatch.setattr(dp_fisher_module, "diagonal_fisher", spy)
    gate = dict(noise_gate=dict(min_snr=0.3))
    correct = [_plans(_adp(**gate), fed, tiny_model_factory) for fed in (tiny_federation, neighbour)]
    assert len(correct[0]) == 2 and correct[0] == correct[1]
    assert len(set(correct[0][0][1].values())) > 1  # a real Fisher split (not uniform)
    public = {row.numpy().tobytes() for row in CohortDataset(tiny_federation.public).images}
    assert seen and all(row.numpy().tobytes() in public for batch in seen for row in batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        broken = [_plans(FisherOnSiteData(dp=False, fisher_max_batches=1, fisher_batch_size=8,
                                          noise="reproducible-insecure", noise_gate=dict(min_snr=0.3),
                                          sample_level_dp=dict(noise_multiplier=1.0, max_grad_norm=1.0,
                                                               accountant="rdp", group_allocation="fisher")),
                         fed, tiny_model_factory) for fed in (tiny_federation, neighbour)]
    assert broken[0] != broken[1], "the Fisher on site data did not move the allocation: the test cannot fail"


# ---- accounting, gate and wiring in MM-PFL-ADP
@pytest.mark.parametrize("allocation", ["fisher", "uniform"])
def test_the_epsilon_reported_is_the_accountants_for_z_eff(allocation, tiny_federation, tiny_model_factory):
    strategy = _adp(allocation, noise_gate=False)
    used: dict[int, list] = {}
    private_training = strategy.private_training

    def spy(site_id, num_examples):
        training = private_training(site_id, num_examples)
        used.setdefault(site_id, []).append(training)
        return training
    strategy.private_training = spy
    run = _run(strategy, tiny_federation, tiny_model_factory)
    per_site = run.summary["sample_level_privacy"]["per_site_epsilon"]
    assert run.summary["sample_level_privacy"]["per_group"]["allocation"] == allocation
    assert used and set(per_site) == set(used)
    for site in tiny_federation.sites:
        trainings = used[site.site_id]
        z_eff = {effective_multiplier(t.group_noise.clip_bounds, t.group_noise.sigmas) for t in trainings}
        assert all(z == pytest.approx(1.0, rel=1e-9) for z in z_eff)
        entries = strategy.sample_dp.ledgers[site.site_id].entries
        assert [e["noise_multiplier"] for e in entries] == [t.group_noise.noise_multiplier for t in trainings]
        assert all(e["name"] == "dp-sgd-per-group" for e in entries)
        steps = sum(e["steps"] for e in entries)
        expected = compute_epsilon(noise_multiplier=max(z_eff), sample_rate=16 / len(site.train), steps=steps,
                                   delta=1e-5, accountant="rdp")
        assert per_site[site.site_id] == pytest.approx(expected, rel=1e-12)


def test_calibrated_sites_stay_within_their_budget(tiny_federation, tiny_model_factory):
    strategy = _adp()
    strategy.sample_dp = type(strategy.sample_dp)(target_epsilon=3.0, accountant="rdp", group_allocation="fisher",
                                                  noise="reproducible-insecure")
    run = _run(strategy, tiny_federation, tiny_model_factory)
    assert 0 < run.summary["sample_level_privacy"]["max_epsilon"] <= 3.0


def test_the_patient_level_gate_reads_the_dp_sgd_noise_and_the_patients_a_round_aggregates():
    """A = B sqrt(m S) / z for equal sites; snr_g = sqrt(T) A C_g / (s_g sqrt(d_g)); the gate drowns by it."""
    assert patients_per_noise([(4, 16, 2.0)] * 5, expected_sites=3.0) == pytest.approx(16 * math.sqrt(12) / 2.0)
    # a site with more noise per step lowers A; the same sites twice change nothing
    uneven = [(4, 16, 2.0), (4, 8, 2.0)]
    assert patients_per_noise(uneven, 3.0) < patients_per_noise([(4, 16, 2.0)], 3.0)
    assert patients_per_noise(uneven * 2, 3.0) == pytest.approx(patients_per_noise(uneven, 3.0))
    with pytest.raises(ConfigError):
        patients_per_noise([(0, 16, 1.0)], 3.0)


def test_mm_pfl_adp_gate_under_patient_level_dp(tiny_federation, tiny_model_factory):
    """The gate's SNR is the documented formula over the run's DP-SGD settings; a drowned group is never
    sent; with every group drowned nothing is sent at all."""
    strategy = _adp("uniform", noise_gate=dict(min_snr=0.3))
    run = _run(strategy, tiny_federation, tiny_model_factory)
    a = 16 * math.sqrt(3 * 2) / 1.0  # B sqrt(m S) / z: 3 sites a round, 2 steps each, batch 16, z = 1
    plan = strategy.group_dp_plan
    for g, snr in strategy.group_dp_snr.items():
        expected = math.sqrt(2) * a * plan.clip_bounds[g] / (plan.unit.sigmas[g] * math.sqrt(plan.group_sizes[g]))
        assert snr == pytest.approx(expected, rel=1e-12)
    assert strategy.drowned == NoiseGate(min_snr=0.3).drowned(strategy.group_dp_snr)
    assert run.summary["noise_gate"]["snr_last_round"] == pytest.approx(strategy.group_dp_snr)
    assert run.summary["sample_level_privacy"]["per_group"]["gate_patients_per_noise"] == pytest.approx(a)
    # uniform noise: all groups share one SNR (0.39 here), so min_snr 0.5 drowns all and 0.3 none
    assert strategy.drowned == frozenset()
    silent = _adp("uniform", noise_gate=dict(min_snr=0.5))
    run = _run(silent, tiny_federation, tiny_model_factory)
    assert silent.drowned == frozenset(silent.group_sizes) and run.history[-1]["cum_bytes_up"] == 0


def test_group_allocation_is_refused_where_nothing_plans_the_groups(tiny_federation, tiny_model_factory):
    with pytest.raises(ConfigError, match="group_allocation"):
        create_strategy("dp-sgd-fedavg", noise_multiplier=1.0, group_allocation="layerwise")
    strategy = create_strategy("dp-sgd-fedavg", noise_multiplier=1.0, group_allocation="fisher")
    with pytest.raises(ConfigError, match="mm-pfl-adp"):
        _run(strategy, tiny_federation, tiny_model_factory)
