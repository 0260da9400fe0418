"""The round's release object (mmpfl_core.privacy.release): validated, serialised whole, and the one source of
the site's noise share, the names it sends, and the server's noise and top-up (issue 21)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mmpfl_core.errors import PrivacyError
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.privacy import NoisePlacement, release_accounting
from mmpfl_core.privacy.release import RoundRelease

SIZES = {"a": 64, "b": 16, "c": 4}
GROUPS = {"a": ["a.w", "a.b"], "b": ["b.w"], "c": ["c.w"]}


def _release(placement="server", drowned=("c",), z=1.3, C=0.5, participants=None, **changes) -> RoundRelease:
    released = [g for g in SIZES if g not in drowned]
    total = sum(SIZES[g] for g in released)
    bounds = {g: (0.0 if g in drowned else C * math.sqrt(SIZES[g] / total)) for g in SIZES}
    # a non-uniform split with z_eff = z: sigma_g^2 proportional to C_g * w_g, scaled to the target
    weights = {"a": 1.0, "b": 3.0, "c": 2.0}
    raw = {g: (0.0 if g in drowned else bounds[g] * weights[g]) for g in SIZES}
    scale = sum(bounds[g] ** 2 / raw[g] for g in released) * z ** 2
    sigmas = {g: (0.0 if g in drowned else math.sqrt(raw[g] * scale)) for g in SIZES}
    if placement == "distributed" and participants is None:
        participants = 4
    fields = dict(round=3, placement=placement, clip_norm=C, clip_bounds=bounds, sigmas=sigmas,
                  drowned=frozenset(drowned), participants=participants, expected_participants=2.5, sample_rate=0.25,
                  noise_multiplier=z, noise="secure")
    fields.update(changes)
    return RoundRelease(**fields)


def test_the_release_checks_z_eff_and_the_clip_budget():
    r = _release()
    assert r.released_groups == ("a", "b") and r.drowned == frozenset({"c"})
    z_eff = sum(r.clip_bounds[g] ** 2 / r.sigmas[g] ** 2 for g in ("a", "b")) ** -0.5
    assert r.effective_multiplier() == pytest.approx(z_eff, rel=1e-15) and z_eff == pytest.approx(1.3, rel=1e-12)
    assert r.accounting() == release_accounting("server", 1.3, 0.25)
    assert _release(placement="local").accounting() == release_accounting("local", 1.3, 0.25)
    with pytest.raises(PrivacyError, match="not the accounted noise_multiplier"):
        dataclasses.replace(r, noise_multiplier=1.0)  # the ledger would not cover the release
    with pytest.raises(PrivacyError, match="would be released with no noise"):
        dataclasses.replace(r, sigmas={**r.sigmas, "b": 0.0})
    with pytest.raises(PrivacyError, match="drowned group 'c'"):
        dataclasses.replace(r, sigmas={**r.sigmas, "c": 0.1})
    with pytest.raises(PrivacyError, match="not C\\^2"):
        dataclasses.replace(r, clip_norm=0.6)
    with pytest.raises(PrivacyError, match="needs the announced participant count"):
        _release(placement="distributed", participants=-1)
    with pytest.raises(PrivacyError, match="only part of a distributed release"):
        _release(placement="server", participants=3)
    with pytest.raises(PrivacyError, match="noise='seeded' is unknown|is unknown"):
        _release(noise="seeded")
    everything = _release(drowned=("a", "b", "c"))
    assert not everything.releases_anything and everything.names_to_send(GROUPS) == set()


def test_record_round_trip_through_a_flower_config_record():
    ConfigRecord = pytest.importorskip("flwr.app").ConfigRecord

    for release in (_release(), _release(placement="distributed", participants=3), _release(drowned=()),
                    _release(placement="local", drowned=("a", "b", "c"))):
        record = release.to_record()
        assert RoundRelease.from_record(record) == release
        wire = dict(ConfigRecord(record))  # what a SuperNode reads out of a train message
        assert RoundRelease.from_record(wire, groups=list(SIZES)) == release
        assert wire["drowned/c"] is ("c" in release.drowned) and isinstance(wire["round"], int)


@pytest.mark.parametrize("change, match", [
    (lambda r: r.pop("drowned/c"), "lacks \\['drowned/c'\\]"),
    (lambda r: r.pop("participants"), "lacks \\['participants'\\]"),
    (lambda r: r.pop("noise_multiplier"), "lacks"),
    (lambda r: r.update({"min_participants": 2}), "unknown key\\(s\\) \\['min_participants'\\]"),
    (lambda r: r.update({"sigma/d": 1.0}), "unknown key"),
    (lambda r: r.update({"drowned/a": 1.0}), "must be a bool"),
    (lambda r: r.update({"round": 3.0}), "must be an integer"),
])
def test_a_missing_or_unknown_key_is_refused(change, match):
    record = _release(placement="distributed", participants=3).to_record()
    change(record)
    with pytest.raises(PrivacyError, match=match):
        RoundRelease.from_record(record, groups=list(SIZES))


def test_a_site_with_other_groups_refuses_the_release():
    record = _release().to_record()
    with pytest.raises(PrivacyError, match="different strategy configurations"):
        RoundRelease.from_record(record, groups=["a", "b", "c", "d"])
    with pytest.raises(PrivacyError, match="different strategy configurations"):
        RoundRelease.from_record(record, groups=["a", "b"])


def test_site_and_server_halves_of_each_placement():
    server, dist, local = _release(), _release(placement="distributed", participants=4), _release(placement="local")
    assert server.participant_stds() == {g: 0.0 for g in SIZES}
    assert server.server_stds(arrived=1) == dict(server.sigmas)
    assert dist.participant_stds() == pytest.approx({g: s / 2 for g, s in dist.sigmas.items()})
    assert dist.server_stds(arrived=4) == {g: 0.0 for g in SIZES}
    # one share missing: the server tops up sigma^2 / 4 so the sum carries sigma^2 exactly
    assert dist.server_stds(arrived=3) == pytest.approx({g: s / 2 for g, s in dist.sigmas.items()})
    m3 = dataclasses.replace(dist, participants=0)
    assert m3.server_stds(arrived=0) == dict(dist.sigmas)
    with pytest.raises(PrivacyError, match="m = 0"):
        m3.participant_stds()
    assert local.participant_stds() == dict(local.sigmas) and local.server_stds(2) == {g: 0.0 for g in SIZES}
    personal = {"b.w"}
    assert server.names_to_send(GROUPS, personal) == {"a.w", "a.b"}  # drowned c and personal b stay home
    assert dist.names_to_send(GROUPS, personal) == {"a.w", "a.b", "b.w"}  # b as a noise-only placeholder
    with pytest.raises(PrivacyError, match="differ from the release"):
        server.names_to_send({"a": ["a.w"]})


def test_a_flower_site_applies_the_release_and_never_builds_one(tiny_federation, tiny_model_factory):
    """The server half builds the release; a second strategy object (a SuperNode) applies it whole and has
    the same clip bounds, noise share and drowned groups; it refuses a release for another round or config."""
    from mmpfl_core.federated.config import FederatedConfig

    def configured(**kw):
        s = create_strategy("mm-pfl-adp", target_epsilon=8.0, clip_norm=0.5, fisher_max_batches=1,
                            fisher_batch_size=8, proxy_trust=None, min_gain=0.0, placement="distributed", **kw)
        model = tiny_model_factory()
        s.configure(config=FederatedConfig(num_rounds=2, device="cpu"), federation=tiny_federation,
                    client_ids=[x.site_id for x in tiny_federation.sites], model=model)
        return s, {n: p.detach().clone() for n, p in model.named_parameters()}

    probe, state = configured(noise_gate={"min_snr": 0.0})
    probe.before_round(1)
    probe.noise_allocation(1, state)
    snrs = sorted(probe.snr.values())
    server, state = configured(noise_gate={"min_snr": (snrs[0] + snrs[-1]) / 2})
    server.before_round(1)
    server.announce_participants(3)
    record = server.round_instructions(1, state)
    release = server.round_release
    assert release.drowned and release.released_groups and record["participants"] == 3
    site, _ = configured(noise_gate={"min_snr": (snrs[0] + snrs[-1]) / 2})
    site.apply_round_instructions(1, record)
    assert site.round_release == release and site.drowned == release.drowned
    assert site.clip_bounds == release.clip_bounds
    assert site.participant_noise_stds() == pytest.approx({g: s / math.sqrt(3) for g, s in release.sigmas.items()})
    with pytest.raises(PrivacyError, match="never computes"):
        site.release_for(2, state)
    with pytest.raises(PrivacyError, match="does not match this site"):
        site.apply_round_instructions(2, record)
    other, _ = configured(noise_gate={"min_snr": 0.0}, noise="reproducible-insecure")
    with pytest.raises(PrivacyError, match="does not match this site"):
        other.apply_round_instructions(1, record)
    assert torch.is_tensor(next(iter(state.values())))
