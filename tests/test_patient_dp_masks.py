"""Under patient-level DP (DP-SGD inside each site) the masks must not leak patients (issue 21, docs/DESIGN.md 4.5).

What leaves a site is compared, tensor for tensor, between two neighbouring federations that differ in one
patient of site 0: removing a VALIDATION patient must change nothing; removing a TRAINING patient may change
it only through the DP-SGD-trained model, so with that model pinned it must change nothing either. The same
comparison flags deliberately broken variants that score masks (MM-PFL-ADP's KL, FedDPA's Fisher) on the
site's raw patients, visible to the server through which groups / coordinates are sent. Noise and seeds are
reproducible here so that equal inputs give equal bits.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import mmpfl_core.federated.feddpa as feddpa_module
import mmpfl_core.federated.strategies as strategies_module  # Strategy.local_training calls local_update there
import mmpfl_core.personalization.masks as masks_module
from mmpfl_core.data.contract import CohortDataset
from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.client import ClientUpdate
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.feddpa import FedDPA
from mmpfl_core.federated.mm_pfl_adp import MMPFLADP
from mmpfl_core.federated.simulation import run_federated

CONFIG = FederatedConfig(num_rounds=1, local=LocalTrainingConfig(local_steps=2, batch_size=16),
                         optimizer=OptimizerConfig(lr=3e-3), bootstrap_resamples=0, checkpoint_every=0, device="cpu")
PATIENT_DP = dict(sample_level_dp=dict(noise_multiplier=1.0, max_grad_norm=1.0), noise="reproducible-insecure")
ADP = dict(dp=False, fisher_max_batches=1, fisher_batch_size=8, **PATIENT_DP)
# The kit's DP-SGD takes no regulariser: FedDPA under patient-level DP runs without R1/R2.
DPA = dict(noise_multiplier=1.0, clip_norm=0.5, accountant="rdp", fisher_threshold=0.3, lambda_1=0.0, lambda_2=0.0,
           **PATIENT_DP)
SITE = 0


def _mask(threshold: float) -> dict:
    # No hysteresis and no minimum of shared groups: the adversary's threshold decides alone (all public settings).
    return dict(mode="threshold", threshold=threshold, hysteresis=0.0, update_every=1, min_shared_groups=0)


# ---- deliberately broken variants: the pre-fix behaviour, scored on the site's raw patients
class _RawScores:
    split = "val"

    def configure(self, *, config, federation, client_ids, model):
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)
        self.raw = {s.site_id: CohortDataset(getattr(s, self.split)) for s in federation.sites}


class ADPScoredOnValidation(_RawScores, MMPFLADP):
    def mask_scoring_data(self, site_id):
        return self.raw[site_id]


class ADPScoredOnTraining(ADPScoredOnValidation):
    split = "train"


class DPAFisherOnTraining(_RawScores, FedDPA):
    split = "train"

    def fisher_scoring_data(self, site_id):
        return self.raw[site_id]


class DPAFisherOnValidation(DPAFisherOnTraining):
    split = "val"


def _without_patient(federation, split: str, index: int = 0):
    """The neighbouring federation: site SITE without patient ``index`` of ``split``."""
    site = federation.sites[SITE]
    cohort = getattr(site, split)
    smaller = dataclasses.replace(site, **{split: cohort.subset(np.delete(np.arange(len(cohort)), index))})
    return dataclasses.replace(federation, sites=(smaller, *federation.sites[1:]))


def _sent(strategy, federation, factory, config=CONFIG):
    """Run and return {round: {name: tensor}} of what site SITE transmitted."""
    log, transmit = {}, strategy.transmit

    def spy(update, round_index):
        out = transmit(update, round_index)
        if update.site_id == SITE:
            log[round_index] = {n: t.detach().clone() for n, t in out.items()}
        return out
    strategy.transmit = spy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reproducible-insecure noise warns (on purpose)
        run_federated(federation, model_factory=factory, strategy=strategy, config=config, progress=False)
    return log


def _differs(a, b) -> bool:
    if a.keys() != b.keys():
        return True
    return any(a[r].keys() != b[r].keys() or any(not torch.equal(a[r][n], b[r][n]) for n in a[r]) for r in a)


def _make(cls, threshold: float | None):
    kw = ADP if issubclass(cls, MMPFLADP) else DPA
    if threshold is not None:
        kw = dict(kw, mask=_mask(threshold))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cls(**kw)


def _adversarial_threshold(broken_cls, federation, neighbour, factory) -> float:
    """The adversary picks the public mask threshold: midway between site SITE's two round-1 scores (with and
    without the patient) of the group whose score moves most, so a mask scored on raw data flips there."""
    scores = []
    for fed in (federation, neighbour):
        strategy = _make(broken_cls, 1e9)
        _sent(strategy, fed, factory)
        scores.append(strategy.masker.masks.scores(SITE))
    a, b = scores
    group = max(a, key=lambda g: abs(a[g] - b[g]) / max(a[g] + b[g], 1e-12))
    assert a[group] != b[group], "the patient did not move any raw score: the test would prove nothing"
    return (a[group] + b[group]) / 2


def _pin_training(monkeypatch):
    """Replace local training by a fixed, data-independent 'trained model' (the DP-SGD output held fixed)."""
    def pinned(model, dataset, *, site_id, training, optimizer, generator, device, regulariser=None,
               private_training=None):
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        noise = torch.Generator().manual_seed(1000 + site_id)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=noise))
        delta = {n: p.detach() - start[n] for n, p in model.named_parameters() if p.requires_grad}
        return ClientUpdate(site_id=site_id, delta=delta, num_examples=0, num_steps=training.local_steps, train_loss=0.0)
    monkeypatch.setattr(strategies_module, "local_update", pinned)


CASES = {  # (correct, broken) per strategy and split of the removed patient
    ("mm-pfl-adp", "val"): (MMPFLADP, ADPScoredOnValidation),
    ("mm-pfl-adp", "train"): (MMPFLADP, ADPScoredOnTraining),
    ("feddpa", "val"): (FedDPA, DPAFisherOnValidation),
    ("feddpa", "train"): (FedDPA, DPAFisherOnTraining),
}


@pytest.mark.parametrize("method,split", list(CASES), ids=lambda v: str(v))
def test_removing_a_patient_changes_nothing_that_leaves_the_site(method, split, tiny_federation, tiny_model_factory,
                                                                 monkeypatch):
    """Validation patient: what site 0 sends is bit-identical. Training patient: bit-identical once the DP-SGD
    output is pinned (so it can change only through the DP-trained model). The raw-data variant is flagged."""
    if split == "train":
        _pin_training(monkeypatch)
    correct, broken = CASES[method, split]
    neighbour = _without_patient(tiny_federation, split)
    threshold = (_adversarial_threshold(broken, tiny_federation, neighbour, tiny_model_factory)
                 if method == "mm-pfl-adp" else None)
    config = dataclasses.replace(CONFIG, num_rounds=2)

    def leaks(cls, threshold=threshold) -> bool:
        sent = [_sent(_make(cls, threshold), fed, tiny_model_factory, config) for fed in (tiny_federation, neighbour)]
        assert sent[0], "site 0 sent nothing: the comparison would prove nothing"
        if method == "mm-pfl-adp" and threshold == 1e-4:  # masks in play: site 0 keeps some groups at home
            full = {n for n, p in tiny_model_factory().named_parameters() if p.requires_grad}
            assert any(set(tensors) < full for tensors in sent[0].values()), "no group was kept personal"
        return _differs(*sent)

    assert leaks(broken), f"the {broken.__name__} variant was not flagged: the test cannot fail"
    assert not leaks(correct)
    if method == "mm-pfl-adp":  # and at a threshold where the public-set masks keep groups at home
        assert not leaks(correct, 1e-4)


def _rows(images: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images}


@pytest.mark.parametrize("method", ["mm-pfl-adp", "feddpa"])
def test_the_scorer_only_ever_receives_public_samples(method, tiny_federation, tiny_model_factory, monkeypatch):
    """Every sample the KL scorer / the site Fisher sees is a public-set sample, never a site's (by content)."""
    seen: list[torch.Tensor] = []
    if method == "mm-pfl-adp":
        original = masks_module.kl_group_scores

        def spy(model, global_state, personal_state, dataset, groups, **kw):
            seen.append(dataset.images)
            return original(model, global_state, personal_state, dataset, groups, **kw)
        monkeypatch.setattr(masks_module, "kl_group_scores", spy)
    else:
        original = feddpa_module.diagonal_fisher

        def spy(model, batches, **kw):
            batches = list(batches)
            seen.extend(inputs[0] for inputs, _ in batches)
            return original(model, iter(batches), **kw)
        monkeypatch.setattr(feddpa_module, "diagonal_fisher", spy)
    strategy = _make(MMPFLADP, 1e-4) if method == "mm-pfl-adp" else _make(FedDPA, None)
    _sent(strategy, tiny_federation, tiny_model_factory)
    assert seen, "the scorer never ran: the test would prove nothing"
    public = _rows(torch.from_numpy(tiny_federation.public.images))
    private = set().union(*(_rows(torch.from_numpy(getattr(s, split).images))
                            for s in tiny_federation.sites for split in ("train", "val", "test")))
    for images in seen:
        rows = _rows(images)
        assert rows <= public and not rows & private


def test_raw_data_masks_under_patient_dp_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="mask_data='public'"):
        MMPFLADP(dp=False, mask_data="validation", sample_level_dp=dict(noise_multiplier=1.0))
    with pytest.raises(ConfigError, match="fisher_data='public'"):
        FedDPA(noise_multiplier=1.0, fisher_data="train", sample_level_dp=dict(noise_multiplier=1.0))
    with pytest.raises(ConfigError, match="unknown"):
        MMPFLADP(dp=False, mask_data="test")
    # Defaults: public under patient-level DP, the site's own data otherwise (client-level DP only).
    assert MMPFLADP(dp=False, sample_level_dp=dict(noise_multiplier=1.0)).mask_data == "public"
    assert MMPFLADP(dp=False).mask_data == "validation"
    assert FedDPA(noise_multiplier=1.0, lambda_1=0.0, lambda_2=0.0,
                  sample_level_dp=dict(noise_multiplier=1.0)).fisher_data == "public"
    with pytest.raises(ConfigError, match="lambda_1=0"):
        FedDPA(noise_multiplier=1.0, sample_level_dp=dict(noise_multiplier=1.0))
    assert FedDPA(noise_multiplier=1.0).fisher_data == "train"
    # Without masks there is nothing to score: patient-level DP with masks=False is fine.
    assert MMPFLADP(dp=False, masks=False, mask_data="validation", sample_level_dp=dict(noise_multiplier=1.0))


def test_feddpa_public_fisher_needs_the_public_set(tiny_federation, tiny_model_factory):
    no_public = dataclasses.replace(tiny_federation, public=None)
    strategy = FedDPA(noise_multiplier=1.0, fisher_data="public")
    with pytest.raises(ConfigError, match="public_size"):
        strategy.configure(config=CONFIG, federation=no_public, client_ids=[0, 1, 2], model=tiny_model_factory())
