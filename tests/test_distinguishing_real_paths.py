"""Distinguishing tests of MM-PFL-ADP's REAL release path (issue 21, defect 9 and the last done-when item).

The harness of ``tests/test_attacks_distinguishing.py`` (:mod:`mmpfl_core.attacks.neighbours`) turns the
noise gate off, replaces the Fisher by a fixed vector and samples every site (q = 1). Here every one of
those is the real thing, in-process, under ``server`` and ``distributed`` placement:

* the strategy is built by ``create_strategy("mm-pfl-adp", ...)`` and set up by its OWN ``configure``
  on a synthetic federation with a public set;
* the Fisher is estimated by the real ``DPFedAvgFisher.compute_fisher`` (diagonal Fisher of the global
  model on the PUBLIC set, model-sampled labels, ``group_fisher``), on an audit model whose four groups
  differ in how strongly they drive the logits, so the bounded Fisher allocation separates them;
* the noise gate is on, with ``min_snr`` set to the groups' SNR under UNIFORM noise (public: qN, z, d),
  so the Fisher split puts some groups below it (drowned: kept at every site, left out of the release)
  and some above (released). Each test checks that the gate really splits, that the allocation used is
  the Fisher one, and that a drowned group does not move in the released model;
* masks: a share of the canaries keeps a released group personal, through the real mask rule
  (``masker.masks.update``) and the real ``transmit`` (server: not sent; distributed: noise-only
  placeholders). Masks scored on raw private data are audited in ``tests/test_patient_dp_masks.py``;
* sites are Poisson-sampled at q = 0.5 (``FederatedConfig.sampling="poisson"``) and the claimed epsilon
  is the strategy ledger's after one release (the accountant's, amplified by sampling; never typed in).

Every round goes through ``select -> client_start_state -> transmit -> aggregate`` (the hooks the
in-process loop and the Flower app call); the broken variants of :mod:`mmpfl_core.attacks.variants`
patch one function of that path each.

Two experiments:
* projection (:func:`_projection`): K canary sites, canary i's update sits on coordinate i of every
  group; statistic T_i = sum_g c_{g,i} x_{g,i} / sigma_g^2 over the RELEASED groups (c: the nominal
  clipped contribution, 0 where the canary keeps the group personal). Per-site clipping, per-coordinate
  noise, per-site Poisson sampling and the fixed denominator make the K canaries of a release
  independent runs of the one-site experiment. Flags ``noise-x0.5`` and ``no-clipping``.
* participant count (:func:`_count`): two sites with ZERO updates (site 1 is the differing one), one
  release per run; statistic: the whitened squared norm sum_{g released} ||x_g||^2 / sigma_g^2 of the
  released sum (chi^2 in both worlds when the divisor is the fixed qN = 1). Dividing by the realised
  count s instead scales the release by qN / s: s = 2 happens only when site 1 exists, so the norm
  reveals it. Flags ``realised-count-denominator`` (a projection cannot: there the common factor qN / s
  scales signal and noise alike).

Unreleased groups sent unnoised through the Flower client, masks from raw private data and a round
released twice after a resume are audited in tests/test_flower_app.py, tests/test_patient_dp_masks.py
and tests/test_write_ahead_ledger.py.

Power, measured over seeds 0-9 for each placement (server | distributed), delta 1e-2, q = 0.5, claim
1.998 (the ledger's PRV epsilon of one release calibrated to 2.0), gate: a and b released (SNR 20.4,
14.4 against the threshold 13.4), c and d drowned (7.2, 6.7); the tests run seed 0:
    projection, 2 x 2000 canaries (about 1400 evaluation runs per world):
        correct                      bound 0.10-0.95 | 0.51-0.86   (never above the claim)
        noise x0.5                   bound 2.21-3.27 | 2.18-3.39   (10/10 flagged each)
        no clipping (1 x 2000)       bound 3.98-4.43 | 3.98-4.44   (10/10)
        realised-count denominator   bound 0.14-0.97 | 0.51-1.09   (not seen by a projection: why the count test exists)
    participant count, 500 releases per world:
        correct                      bound 0.00 | 0.00, accuracy 0.48-0.51
        realised-count denominator   bound 2.55-3.07 | 2.38-3.07 (10/10 flagged each), accuracy 0.58-0.64
On seed 0: projection correct 0.72 | 0.72, halved 2.47 | 2.94, no clipping 4.19 | 4.19; count correct 0.00 | 0.00,
realised count 2.74 | 2.70. Cost: the whole file 8-12 s on the shared 2-core machine.
All runs use the reproducible (NOT private) noise mode with fixed seeds, so CI is deterministic.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mmpfl_core.attacks.distinguishing import distinguishing_lower_bound
from mmpfl_core.attacks.neighbours import REPRODUCIBLE_NOISE
from mmpfl_core.attacks.variants import broken_mechanism
from mmpfl_core.data.federation import FederationConfig, build_federation
from mmpfl_core.data.synthetic import SyntheticCohortConfig
from mmpfl_core.federated.client import ClientUpdate
from mmpfl_core.federated.config import FederatedConfig
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.privacy import calibrate_noise
from mmpfl_core.privacy.clipping import clip_per_group
from mmpfl_core.seeding import numpy_generator

GROUPS = ("a", "b", "c", "d")
#: How strongly each group drives the logits: the public-set Fisher of group g scales as its square, so
#: the Fisher allocation gives a and b less noise than uniform and c and d more (the gate splits there).
LOGIT_SCALE = {"a": 4.0, "b": 2.0, "c": 0.5, "d": 0.25}
NAME = {g: f"{g}.weight" for g in GROUPS}  # each group is one (1, size) weight
EPSILON, DELTA, Q, CLIP = 2.0, 1e-2, 0.5, 1.0
_COIN, _SAMPLING, _SPLIT, _MASK = 91, 92, 93, 94


class _AuditModel(nn.Module):
    """Four groups of ``size`` coordinates (one bias-free linear map each, a layer Opacus's per-sample
    hooks know); logits (0, z, -z) with z = sum_g s_g <x, w_g> on the first ``size`` pixels x of the
    scan (the cohort's batch format, so the REAL Fisher code runs on it)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        for g in GROUPS:
            self.add_module(g, nn.Linear(size, 1, bias=False))
            nn.init.zeros_(getattr(self, g).weight)

    def forward(self, images: torch.Tensor, modality_mask: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)  # (B, M * H * W)
        x = x.repeat(1, math.ceil(self.size / x.shape[1]))[:, :self.size]  # (B, size)
        z = sum(LOGIT_SCALE[g] * getattr(self, g)(x)[:, 0] for g in GROUPS)  # (B,)
        return torch.stack([torch.zeros_like(z), z, -z], dim=1)  # (B, 3)

    def parameter_groups(self) -> dict[str, list[str]]:
        return {g: [NAME[g]] for g in GROUPS}

    def group_sizes(self) -> dict[str, int]:
        return {g: self.size for g in GROUPS}


@pytest.fixture(scope="module")
def federation():
    # Only the PUBLIC set is used (the Fisher); the sites' splits are never read by these releases.
    return build_federation(SyntheticCohortConfig(num_subjects=120, image_size=32, seed=3),
                            FederationConfig(num_sites=2, alpha=1.0, public_size=30, seed=3))


def _strategy(federation, placement: str, num_sites: int, size: int, num_rounds: int, seed: int = 0):
    """MM-PFL-ADP as a user builds it, set up by its own configure(); the gate's threshold is the groups'
    SNR under uniform noise (public: qN, z from the same calibration, d), so the Fisher split decides."""
    z = calibrate_noise(target_epsilon=EPSILON, target_delta=DELTA, sample_rate=Q, steps=1, accountant="prv")
    uniform_snr = Q * num_sites / (z * math.sqrt(len(GROUPS) * size))  # release_snr with sigma_g = z C, T = 1
    strategy = create_strategy("mm-pfl-adp", target_epsilon=EPSILON, delta=DELTA, clip_norm=CLIP, placement=placement,
                               accountant="prv", budget_stop=False, calibration_rounds=1, noise=REPRODUCIBLE_NOISE,
                               noise_gate={"min_snr": uniform_snr, "rounds": 1},
                               # one public-set Fisher for the run (the global model the tests release from
                               # never changes); the proxy checks off so the allocation is the Fisher split
                               fisher_every=10 ** 6, proxy_trust=None, min_gain=0.0)
    fed = FederatedConfig(num_rounds=num_rounds, client_fraction=Q, sampling="poisson", seed=seed, checkpoint_every=0)
    model = _AuditModel(size)
    strategy.configure(config=fed, federation=federation, client_ids=list(range(num_sites)), model=model)
    return strategy, fed, {NAME[g]: torch.zeros(1, size) for g in GROUPS}


def _keep_b_personal(strategy, site: int) -> None:
    """The real mask rule: a KL score above the threshold on b (and none elsewhere) makes b personal."""
    strategy.masker.masks.update(site, 0, {g: (1.0 if g == "b" else 0.0) for g in GROUPS})
    assert strategy.masker.personal_groups(site) == frozenset({"b"})


def _release(strategy, fed, present, deltas, round_index: int, start):
    """One round of the real path. Returns the released SUM x = (new - start) qN, the release and the
    number of sites sampled."""
    strategy.before_round(round_index)
    sampled = strategy.select(present, fed, numpy_generator(fed.seed, _SAMPLING, round_index))
    updates, sent = [], []
    for i in sampled:
        strategy.client_start_state(i, start)
        update = ClientUpdate(site_id=i, delta=deltas(i), num_examples=1, num_steps=1, train_loss=0.0)
        updates.append(update)
        sent.append(strategy.transmit(update, round_index))
    new = strategy.aggregate(start, updates, sent, round_index)
    release = strategy.release_for(round_index, start)
    total = {g: (new[NAME[g]] - start[NAME[g]]).double()[0] * strategy.expected_participants for g in GROUPS}
    return total, release, len(sampled)


def _check_gate_splits(strategy, release, total) -> None:
    """The gate keeps some groups home and releases others, with the Fisher allocation; a drowned group
    does not move in the released model."""
    assert strategy.allocation_used == "fisher", strategy.fallback_reason
    assert release.drowned and release.released_groups, (sorted(release.drowned), strategy.snr)
    assert "b" in release.released_groups  # the canaries' masks act on a released group
    for g in release.drowned:
        assert torch.count_nonzero(total[g]) == 0, g


def _projection(federation, placement: str, variant: str, num_canaries: int, num_releases: int, seed: int = 0):
    k = num_canaries
    strategy, fed, start = _strategy(federation, placement, k, k, num_releases, seed)
    masked = numpy_generator(seed, _MASK).random(k) < 0.5
    for i in np.flatnonzero(masked):
        _keep_b_personal(strategy, int(i))
    value = 10.0 / math.sqrt(len(GROUPS))  # the canary's norm 10 spread evenly: far above every C_g
    stats, claimed = {0: [], 1: []}, None
    with broken_mechanism(variant, strategy):
        for t in range(1, num_releases + 1):
            world = numpy_generator(seed, _COIN, t).random(k) < 0.5  # True: canary i exists (D1)

            def deltas(i: int) -> dict[str, torch.Tensor]:
                out = {NAME[g]: torch.zeros(1, k) for g in GROUPS}
                for g in GROUPS:
                    out[NAME[g]][0, i] = value
                return out
            total, release, _ = _release(strategy, fed, [i for i in range(k) if world[i]], deltas, t, start)
            if variant == "correct":
                _check_gate_splits(strategy, release, total)
            claimed = strategy.ledger.epsilon() if claimed is None else claimed  # one release's epsilon
            nominal, _ = clip_per_group({g: torch.full((1,), value) for g in release.released_groups},
                                        {g: [g] for g in release.released_groups}, dict(release.clip_bounds))
            score = np.zeros(k)
            for g in release.released_groups:
                weight = float(nominal[g][0]) * (np.where(masked, 0.0, 1.0) if g == "b" else 1.0)
                score += weight * total[g].numpy() / release.sigmas[g] ** 2
            stats[1].extend(score[world].tolist())
            stats[0].extend(score[~world].tolist())
    return distinguishing_lower_bound(np.array(stats[0]), np.array(stats[1]), delta=DELTA,
                                      rng=numpy_generator(seed, _SPLIT), claimed_epsilon=claimed, variant=variant,
                                      label=f"mm-pfl-adp/{placement}/gate-split/q={Q}/projection")


def _count(federation, placement: str, variant: str, runs_per_world: int, size: int = 32, seed: int = 0):
    runs = 2 * runs_per_world
    strategy, fed, start = _strategy(federation, placement, 2, size, runs, seed)
    _keep_b_personal(strategy, 1)  # the differing site keeps b (distributed: a noise-only placeholder)
    world = numpy_generator(seed, _COIN).random(runs) < 0.5
    stats, claimed = {0: [], 1: []}, None
    with broken_mechanism(variant, strategy):
        for t in range(1, runs + 1):
            present = [0, 1] if world[t - 1] else [0]
            total, release, _ = _release(strategy, fed, present,
                                         lambda i: {NAME[g]: torch.zeros(1, size) for g in GROUPS}, t, start)
            if variant == "correct":
                _check_gate_splits(strategy, release, total)
            claimed = strategy.ledger.epsilon() if claimed is None else claimed
            stat = sum(float((total[g] ** 2).sum()) / release.sigmas[g] ** 2 for g in release.released_groups)
            stats[int(world[t - 1])].append(stat)
    return distinguishing_lower_bound(np.array(stats[0]), np.array(stats[1]), delta=DELTA,
                                      rng=numpy_generator(seed, _SPLIT), claimed_epsilon=claimed, variant=variant,
                                      label=f"mm-pfl-adp/{placement}/gate-split/q={Q}/count")


@pytest.mark.parametrize("placement", ["server", "distributed"])
def test_gate_split_release_holds_its_claim_and_halved_noise_is_caught(federation, placement):
    correct = _projection(federation, placement, "correct", 2000, 2)
    assert correct.claimed_epsilon == pytest.approx(EPSILON, abs=0.01)  # the ledger's, one release at q = 0.5
    assert not correct.violates_claim, correct
    halved = _projection(federation, placement, "noise-x0.5", 2000, 2)
    assert halved.violates_claim, halved


@pytest.mark.parametrize("placement", ["server", "distributed"])
def test_gate_split_release_catches_a_missing_clip(federation, placement):
    result = _projection(federation, placement, "no-clipping", 2000, 1)
    assert result.violates_claim, result


@pytest.mark.parametrize("placement", ["server", "distributed"])
def test_gate_split_release_catches_a_realised_count_denominator(federation, placement):
    correct = _count(federation, placement, "correct", 500)
    assert not correct.violates_claim, correct
    broken = _count(federation, placement, "realised-count-denominator", 500)
    assert broken.violates_claim, broken


@pytest.mark.parametrize("placement", ["server", "distributed"])
def test_realised_count_variant_divides_by_the_count_and_the_correct_release_by_qn(federation, placement):
    """The variant patches the one divisor of release_sum: with the same reproducible noise, the broken
    release is exactly the correct one times qN / s (s: the sites sampled), so it is the bug named."""
    num_sites, size = 7, 32  # qN = 3.5: never a realised count

    def update(i: int) -> dict[str, torch.Tensor]:
        return {NAME[g]: torch.full((1, size), 0.1 * (i + 1)) for g in GROUPS}
    out = {}
    for variant in ("correct", "realised-count-denominator"):
        strategy, fed, start = _strategy(federation, placement, num_sites, size, 1)
        with broken_mechanism(variant, strategy):
            total, release, sampled = _release(strategy, fed, list(range(num_sites)), update, 1, start)
        out[variant] = total
    assert strategy.expected_participants == Q * num_sites and sampled not in (0, Q * num_sites)
    assert release.released_groups and release.drowned  # the gate splits here too
    for g in release.released_groups:
        expected = out["correct"][g] * strategy.expected_participants / sampled
        assert torch.allclose(out["realised-count-denominator"][g], expected, rtol=1e-5, atol=1e-6), g
    assert hasattr(strategy, "_denominator") and strategy._denominator(sampled) == Q * num_sites  # patch undone
