"""The cross-silo strategies' batched pass (``batched_sites``, simulation only): every site's per-patient clipped
sums of a round computed at once equal the per-site path's (the reference), with personal groups, masks, group
clipping and sites of 0 sampled patients; a whole run releases the same global models round by round with the same
epsilon; batched variants that clip a site's sum instead of each patient, or give patients another site's
parameters, are caught."""

from __future__ import annotations

import warnings

import pytest
import torch

from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.cross_silo_dp_sgd import CrossSiloDPSGD
from mmpfl_core.federated.mm_pfl_adp_cross_silo import MMPFLADPCrossSilo
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.models.presets import create_model
from mmpfl_core.pretraining import restrict_trainable

TOL = 1e-5  # float32: the union batch sums and reduces in another order than site by site


def _config(rounds: int) -> FederatedConfig:
    return FederatedConfig(
        num_rounds=rounds,
        client_fraction=1.0,
        local=LocalTrainingConfig(local_steps=1, batch_size=16),
        optimizer=OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.0),
        bootstrap_resamples=0,
        checkpoint_every=0,
        device="cpu",
    )


def _strategy(cls, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reproducible-insecure noise warns, on purpose
        return cls(noise="reproducible-insecure", noise_multiplier=1.2, **kwargs)


# the arms: everything shared (one Opacus pass over the union), a personal head (per-patient parameters), and
# MM-PFL-ADP with masks (per-site personal sets, per-group clipping) and without
ARMS = {
    "shared": (CrossSiloDPSGD, {"max_grad_norm": 0.5}),
    "personal-head": (CrossSiloDPSGD, {"max_grad_norm": 0.5, "personal_groups": ("head",)}),
    "mmpfl-masks": (MMPFLADPCrossSilo, {"max_grad_norm": 0.5, "mask": {"always_personal": ["head"]}}),
    "mmpfl-nomask": (MMPFLADPCrossSilo, {"max_grad_norm": 0.5, "masks": False, "mask": {"always_personal": ["head"]}}),
}


def _perturbed_personal_copies(strategy, model, sites) -> None:
    """Give every site its own personal copy of every trainable tensor (different per site), as after training."""
    generator = torch.Generator().manual_seed(5)
    for site in sites:
        strategy.personal[site] = {
            n: p.detach() + 0.05 * torch.randn(p.shape, generator=generator)
            for n, p in model.named_parameters()
            if p.requires_grad
        }


def _batched_vs_per_site(cls, kwargs, federation, model_factory, *, empty=(), rounds=3) -> float:
    """Max |batched - per-site| over every site's clipped sums and losses of one round (sites in ``empty``
    sample nobody); asserts the batched pass served every site."""
    strategy = _strategy(cls, **kwargs)
    model = model_factory()
    strategy.configure(config=_config(rounds), federation=federation, client_ids=[0], model=model)
    sites = sorted(strategy.site_sizes)
    strategy.select(sites, _config(rounds), None)
    round_index = rounds  # past MM-PFL-ADP's warm-up: its masks differ by site
    strategy.before_round(round_index)
    global_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(strategy, MMPFLADPCrossSilo):
        strategy.plan_round(round_index, global_state)
        strategy.site_masks[sites[0]] = frozenset(strategy.groups)  # site 0 keeps everything, the others the head
        _perturbed_personal_copies(strategy, model, sites)
    elif strategy.personal_names:
        _perturbed_personal_copies(strategy, model, sites)
    samples = strategy._round_samples(round_index)
    for site in empty:
        samples[site] = samples[site][:0]
    assert all(len(samples[s]) > 0 for s in sites if s not in empty)
    batched = strategy.batched_clipped_sums(model, global_state, samples, torch.device("cpu"))
    worst = 0.0
    for site in sites:
        model.load_state_dict(strategy.client_start_state(site, global_state), strict=False)
        assert strategy._entry_matches(batched[site], model, strategy._site_data[site], samples[site])
        if len(samples[site]) == 0:
            reference = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
            loss = 0.0
        else:
            reference, loss = strategy.clip_batch(model, strategy._site_data[site].batch(samples[site]), "cpu")
        assert set(reference) == set(batched[site].sums)
        for n, ref in reference.items():
            worst = max(worst, float((batched[site].sums[n] - ref).abs().max()))
        worst = max(worst, abs(batched[site].loss - loss) / max(1.0, abs(loss)))
    return worst


@pytest.mark.parametrize("arm", list(ARMS))
def test_batched_sums_equal_the_per_site_sums(arm, tiny_federation, tiny_model_factory):
    cls, kwargs = ARMS[arm]
    assert _batched_vs_per_site(cls, kwargs, tiny_federation, tiny_model_factory) < TOL
    # a site that samples nobody gets zeros (and still its noise and ledger entry, by the strategy's own code)
    assert _batched_vs_per_site(cls, kwargs, tiny_federation, tiny_model_factory, empty=(1,)) < TOL


def _headline_model_factory(federation):
    """hybrid-tiny (convolutional stem) with only the head and every bias and norm trainable, as ``make demo``:
    frozen parameters enter the batched pass as the working model's, unbatched."""
    ref = federation.sites[0].train

    def factory():
        model = create_model("hybrid-tiny", seed=0, image_size=32, num_modalities=ref.num_modalities,
                             num_clinical=len(ref.clinical_names), num_classes=ref.num_classes)  # fmt: skip
        restrict_trainable(model, "head+bias")
        return model

    return factory


@pytest.mark.parametrize("arm", ["shared", "mmpfl-masks"])
def test_batched_sums_equal_the_per_site_sums_on_the_headline_model(arm, tiny_federation):
    cls, kwargs = ARMS[arm]
    assert _batched_vs_per_site(cls, kwargs, tiny_federation, _headline_model_factory(tiny_federation)) < TOL


class _ClipsTheSiteSum(CrossSiloDPSGD):
    """BROKEN on purpose: sums a site's raw per-patient gradients and clips the SUM (site-level, not patient)."""

    @staticmethod
    def reduce_to_sites(per_sample, factors, site_of, num_sites):
        raw = CrossSiloDPSGD.reduce_to_sites(per_sample, {n: torch.ones_like(f) for n, f in factors.items()},
                                             site_of, num_sites)  # fmt: skip
        norms = torch.stack([(g.double() ** 2).sum(1) for g in raw.values()]).sum(0).sqrt()
        coef = (0.5 / (norms + 1e-6)).clamp(max=1.0).to(next(iter(raw.values())).dtype)
        return {n: g * coef.unsqueeze(1) for n, g in raw.items()}


class _MixesSites(MMPFLADPCrossSilo):
    """BROKEN on purpose: every patient is evaluated at the first site's parameters."""

    @staticmethod
    def per_patient_state(starts, site_of):
        return MMPFLADPCrossSilo.per_patient_state(starts, torch.zeros_like(site_of))


def test_broken_batched_variants_are_caught(tiny_federation, tiny_model_factory):
    site_clip = _batched_vs_per_site(_ClipsTheSiteSum, {"max_grad_norm": 0.5}, tiny_federation, tiny_model_factory)
    mixed = _batched_vs_per_site(_MixesSites, ARMS["mmpfl-masks"][1], tiny_federation, tiny_model_factory)
    assert site_clip > 100 * TOL
    assert mixed > 100 * TOL


class _Recording:
    """Keeps every released global model (the aggregate's output) of the run."""

    def aggregate(self, global_state, updates, sent, round_index):
        out = super().aggregate(global_state, updates, sent, round_index)
        self.released.append({n: t.detach().clone() for n, t in out.items()})
        return out


def _run(cls, kwargs, federation, model_factory, *, batched: bool, rounds: int):
    recording = type("Recording" + cls.__name__, (_Recording, cls), {"released": None})
    strategy = _strategy(recording, batched_sites=batched, **kwargs)
    strategy.released = []
    run = run_federated(federation, model_factory=model_factory, strategy=strategy, config=_config(rounds),
                        progress=False)  # fmt: skip
    return strategy, run.summary["sample_level_privacy"]


@pytest.mark.parametrize("arm", ["shared", "personal-head", "mmpfl-masks"])
def test_a_whole_run_releases_the_same_models_and_epsilon(arm, tiny_federation, tiny_model_factory):
    cls, kwargs = ARMS[arm]
    rounds = 4  # MM-PFL-ADP: two warm-up rounds, then shares under per-site masks
    loop, loop_privacy = _run(cls, kwargs, tiny_federation, tiny_model_factory, batched=False, rounds=rounds)
    fast, fast_privacy = _run(cls, kwargs, tiny_federation, tiny_model_factory, batched=True, rounds=rounds)
    num_sites = len(tiny_federation.sites)
    assert loop.batched_hits == 0 and fast.batched_hits == num_sites * rounds  # the batched path was taken
    assert (fast._vmap_template is not None) == (arm != "shared")  # per-patient parameters where sites differ
    assert len(loop.released) == len(fast.released) == rounds
    for a, b in zip(loop.released, fast.released, strict=True):
        assert set(a) == set(b)
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-5)
    for site in loop.personal:
        for n, t in loop.personal[site].items():
            torch.testing.assert_close(fast.personal[site][n].detach(), t.detach(), rtol=1e-4, atol=1e-5)
    assert fast_privacy["max_epsilon"] == loop_privacy["max_epsilon"] > 0
    assert fast_privacy["steps"] == loop_privacy["steps"] == rounds
    if isinstance(loop, MMPFLADPCrossSilo):
        assert fast.site_masks == loop.site_masks


class _OwnClipping(CrossSiloDPSGD):
    """A subclass with its own clip_batch and no per-patient factors for it (here: the parent's rule at C / 2)."""

    def clip_batch(self, model, batch, device):
        self.max_grad_norm, old = self.max_grad_norm / 2, self.max_grad_norm
        try:
            return super().clip_batch(model, batch, device)
        finally:
            self.max_grad_norm = old


def test_a_subclass_with_its_own_clip_batch_takes_the_per_site_path(tiny_federation, tiny_model_factory):
    strategy, _ = _run(_OwnClipping, {"max_grad_norm": 0.5}, tiny_federation, tiny_model_factory, batched=True,
                       rounds=1)  # fmt: skip
    assert strategy.batched_hits == 0
    assert MMPFLADPCrossSilo(noise_multiplier=1.0)._batched_rule_matches()  # its clip_batch and factors agree


def test_a_model_with_dropout_takes_the_per_site_path(tiny_federation, tiny_model_factory):
    def with_dropout():
        model = tiny_model_factory()
        model.extra_dropout = torch.nn.Dropout(0.1)  # never called, but a random mask a batch could not share
        return model

    strategy, _ = _run(CrossSiloDPSGD, {"max_grad_norm": 0.5}, tiny_federation, with_dropout, batched=True, rounds=1)
    assert strategy.batched_hits == 0


def test_secure_noise_runs_batched_from_the_os_csprng(tiny_federation, tiny_model_factory, monkeypatch):
    """Secure mode: the round's samples are drawn once, from the OS CSPRNG (never the seeded stream), and every
    site's turn uses its own; the ledger is the per-site path's."""
    from mmpfl_core.federated import cross_silo_dp_sgd as module

    drawn = []
    real = module.poisson_batch
    monkeypatch.setattr(module, "poisson_batch", lambda n, q, gen: drawn.append(gen) or real(n, q, gen))
    strategy = CrossSiloDPSGD(noise_multiplier=1.2, max_grad_norm=0.5, personal_groups=("head",))
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy, config=_config(2),
                        progress=False)  # fmt: skip
    num_sites = len(tiny_federation.sites)
    assert strategy.batched_hits == 2 * num_sites
    assert len(drawn) == 2 * num_sites and all(gen is None for gen in drawn)  # one CSPRNG draw per site and round
    assert run.summary["sample_level_privacy"]["steps"] == 2
