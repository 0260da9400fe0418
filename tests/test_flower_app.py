"""The Flower app (flower_app/, issue 7): config mapping, reply validation, SecAgg+ range checks (fast),
and equivalence with the in-process engine on Flower's Ray simulation engine (one Ray start-up).

Issue 21: what a SuperNode sends is tested on the REAL client step (``client_app._train_step``) with the
server's whole release record, against deliberately broken sites (the old hand-picked filter, no noise
share, a share for m = 1) that must be flagged; MM-PFL-ADP with a noise gate that splits the groups runs
through the app on Ray with server placement and with distributed placement over SecAgg+ (two Ray start-ups).

The simulation test trains FedAvg and DP-FedAvg for 2 rounds on the smoke preset through the SAME
ServerApp/ClientApp that `flwr run` uses and checks the final global parameters and epsilon against
``run_method`` (in-process, one torch thread as in each virtual SuperNode): bit-identical here, the
tolerance only guards against a different BLAS. Skipped only if Ray cannot start.
"""
from __future__ import annotations

import json
import math
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("flwr")
APP_DIR = Path(__file__).resolve().parent.parent / "flower_app"
sys.path.insert(0, str(APP_DIR))

from mmpfl_core.errors import ConfigError, PrivacyError  # noqa: E402
from mmpfl_flower.task import (DEFAULT_RUN_CONFIG, FlowerSettings, MalformedReply, check_secagg_range,  # noqa: E402
                               check_secagg_values, configured_strategy, load_job, load_jobs, new_model,
                               validate_reply)

SMOKE = dict(preset="reproduce_smoke", num_rounds=2)


# ------------------------------------------------------------------ fast: config mapping
def test_run_config_defaults_are_the_app_pyproject():
    toml = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert DEFAULT_RUN_CONFIG == toml["tool"]["flwr"]["app"]["config"]
    assert toml["tool"]["flwr"]["app"]["components"] == {"serverapp": "mmpfl_flower.server_app:app",
                                                         "clientapp": "mmpfl_flower.client_app:app"}


def test_load_job_maps_kebab_keys_once():
    job = load_job({"preset": "reproduce_smoke", "method": "dp-fedavg", "num-rounds": 3, "seed": 7,
                    "method-args": '{"clip_norm": 0.25}', "num-sites": 4})
    assert job.experiment.federated.num_rounds == 3
    assert job.experiment.federated.seed == job.experiment.data.seed == job.experiment.federation.seed == 7
    assert job.experiment.federation.num_sites == 4 and job.flower.min_nodes == 4
    assert job.method.strategy == "dp-fedavg" and job.method.kwargs["clip_norm"] == 0.25
    assert [j.method.label for j in load_jobs(preset="reproduce_smoke", method="fedavg, dp-fedavg")] == ["fedavg", "dp-fedavg"]


@pytest.mark.parametrize("bad, match", [
    ({"num-round": 3}, "unknown Flower run-config"),
    ({"method": "nope"}, "is not a method of preset"),
    ({"method": "local-only"}, "sends nothing over a network"),
    ({"method": "dp-fedavg", "placement": "distributed", "secagg": "off"}, "without secure aggregation"),
    ({"method": "fedavg", "secagg": "on"}, "needs placement='distributed'"),
    ({"method-args": "[1]"}, "must be a JSON object"),
    ({"round-timeout": 0}, "must be > 0"),
])
def test_load_job_rejects_bad_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_job({"preset": "reproduce_smoke", "method": "fedavg", **bad})


def test_load_job_refuses_a_pretraining_stage_it_does_not_run(tmp_path):
    """Each SuperNode would pretrain its own public model and only the private part travels: refused, fix named."""
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml").read_text()
    assert "pretraining:\n  enabled: false" in text
    path = tmp_path / "pretrained.yaml"
    path.write_text(text.replace("pretraining:\n  enabled: false", "pretraining:\n  enabled: true"))
    load_job({"preset": str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"), "method": "fedavg"})
    with pytest.raises(ConfigError, match="does not run a public pretraining stage"):
        load_job({"preset": str(path), "method": "fedavg"})


# ------------------------------------------------------------------ fast: what arrives is checked
SHAPES = {"w": (2, 3), "b": (3,)}


def _arrays(**changes):
    arrays = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}
    arrays.update(changes)
    return arrays


def test_validate_reply_accepts_a_good_reply():
    validate_reply(_arrays(), SHAPES, num_examples=12, site=1, expected_sites={0, 1})


@pytest.mark.parametrize("arrays, num_examples, site, match", [
    (_arrays(w=np.full((2, 3), np.nan, np.float32)), 12, 1, "non-finite"),
    (_arrays(b=np.array([np.inf, 0, 0], np.float32)), 12, 1, "non-finite"),
    (_arrays(w=np.zeros((3, 2), np.float32)), 12, 1, "shape"),
    (_arrays(extra=np.zeros(1, np.float32)), 12, 1, "unknown parameter"),
    (_arrays(), -5, 1, "positive integer"),
    (_arrays(), 0, 1, "positive integer"),
    (_arrays(), 2.5, 1, "positive integer"),
    (_arrays(), True, 1, "positive integer"),
    (_arrays(), 12, 7, "was not asked"),
])
def test_validate_reply_rejects_malformed(arrays, num_examples, site, match):
    with pytest.raises(MalformedReply, match=match):
        validate_reply(arrays, SHAPES, num_examples=num_examples, site=site, expected_sites={0, 1})


def _reply(node, site, arrays, num_examples, error=False):
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    content = RecordDict({"arrays": ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrays.items()}),
                          "metrics": MetricRecord({"site": site, "num-examples": num_examples, "train-loss": 1.0,
                                                   "num-steps": 2})})
    return SimpleNamespace(has_error=lambda: error, error="boom", content=content,
                           metadata=SimpleNamespace(src_node_id=node))


def test_server_aggregates_only_valid_replies_exactly_as_the_core():
    """Malformed replies (NaN, negative count, wrong shape, wrong node, failure) are dropouts; the rest
    go through the kit strategy's own aggregation, summed in site order."""
    from mmpfl_core.federated.client import ClientUpdate, trainable_state
    from mmpfl_flower.strategy import KitStrategy

    job = load_job(**SMOKE, method="fedavg")
    model = new_model(job)
    core = configured_strategy(job, model)
    state = trainable_state(model)
    kit = KitStrategy(job, core, state, node_sites={10: 0, 11: 1, 12: 2})
    kit.selected = [0, 1, 2]
    gen = torch.Generator().manual_seed(0)
    good = {n: (0.01 * torch.randn(t.shape, generator=gen)).numpy() for n, t in state.items()}
    good2 = {n: (0.01 * torch.randn(t.shape, generator=gen)).numpy() for n, t in state.items()}
    nan = {**good, next(iter(good)): np.full_like(next(iter(good.values())), np.nan)}
    replies = [_reply(12, 2, good2, 30), _reply(10, 0, good, 20), _reply(11, 1, nan, 25),
               _reply(11, 1, good, -3), _reply(12, 0, good, 5), _reply(10, 0, good, 5, error=True)]
    arrays, metrics = kit.aggregate_train(1, replies)
    assert metrics["num_responded"] == 2 and metrics["num_rejected"] == 3 and metrics["num_failed"] == 1
    expected = core.aggregate(state, [ClientUpdate(0, {}, 20, 2, 1.0), ClientUpdate(2, {}, 30, 2, 1.0)],
                              [{n: torch.from_numpy(a) for n, a in good.items()},
                               {n: torch.from_numpy(a) for n, a in good2.items()}], 1)
    got = arrays.to_torch_state_dict()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


# ------------------------------------------------------------------ fast: SecAgg+ quantisation range
def _distributed_release(m=2, **kw):
    job = load_job(**SMOKE, method="dp-fedavg", placement="distributed", **kw)
    model = new_model(job)
    core = configured_strategy(job, model)
    core.before_round(1)
    core.announce_participants(m)  # SecAgg+ rounds have m >= 2 announced participants, each adding sigma^2/m
    instructions = core.round_instructions(1, {n: p.detach() for n, p in model.named_parameters()})
    return job, core, instructions


def test_secagg_range_is_sized_for_the_whole_vector_and_every_round():
    """R must make a refusal (a noised value beyond R) unlikely over d coordinates x m participants x T
    rounds, not per coordinate: C + 6 s (the old rule) is refused; the default R = 8 passes here."""
    from mmpfl_flower.task import secagg_min_range, secagg_refusal_bound

    job, core, instructions = _distributed_release()
    assert instructions["participants"] == 2
    T = job.experiment.federated.num_rounds
    bound = check_secagg_range(core, instructions, job.flower, rounds=T)  # default range 8
    assert bound <= job.flower.secagg_refusal_probability
    release = core.round_release
    s = max(release.participant_stds().values())
    old_rule = release.clip_norm + 6 * s
    d = sum(core.group_sizes.values())
    # the old per-coordinate rule: about 2e-9 per coordinate, times d x m x T over the run
    assert secagg_refusal_bound(release, core.group_sizes, old_rule, rounds=T) > 100 * job.flower.secagg_refusal_probability
    with pytest.raises(ConfigError, match="secagg-clipping-range"):
        check_secagg_range(core, instructions, FlowerSettings(secagg=True, secagg_clipping_range=old_rule), rounds=T)
    need = secagg_min_range(release, core.group_sizes, rounds=T, refusal_probability=1e-9)
    assert old_rule < need < 8.0
    assert secagg_refusal_bound(release, core.group_sizes, need, rounds=T) <= 1e-9
    # More rounds need a wider range (union bound over T).
    assert secagg_min_range(release, core.group_sizes, rounds=100 * T, refusal_probability=1e-9) > need
    assert d > 1000
    with pytest.raises(ConfigError, match="at most delta / 10"):
        check_secagg_range(core, instructions, FlowerSettings(secagg=True, secagg_refusal_probability=1e-3), rounds=T)
    with pytest.raises(ConfigError, match="min_participants"):  # the m_min shares are gone (issue 14)
        configured_strategy(load_job(**SMOKE, method="dp-fedavg", placement="distributed",
                                     method_args=json.dumps({"min_participants": 2})), new_model(job))


def test_secagg_refusal_bound_matches_simulated_refusals():
    """Numerically: draw the whole noised vector of m participants over T rounds many times; the fraction
    of runs in which some value leaves [-R, R] stays below the bound and near it (the union bound is
    tight for rare events), at an R sized for a refusal probability of 5%."""
    from mmpfl_flower.task import secagg_min_range, secagg_refusal_bound
    from mmpfl_core.privacy.release import RoundRelease

    sizes = {"a": 300, "b": 100}
    C, z = 0.5, 1.0
    bounds = {"a": C * math.sqrt(300 / 400), "b": C * math.sqrt(100 / 400)}
    release = RoundRelease(round=1, placement="distributed", clip_norm=C, clip_bounds=bounds,
                           sigmas={g: z * C for g in sizes}, drowned=frozenset(), participants=3,
                           expected_participants=3.0, sample_rate=1.0, noise_multiplier=z)
    T, runs = 2, 4000
    R = secagg_min_range(release, sizes, rounds=T, refusal_probability=0.05)
    assert secagg_refusal_bound(release, sizes, R, rounds=T) == pytest.approx(0.05, rel=1e-3)
    gen = torch.Generator().manual_seed(0)
    refused = torch.zeros(runs, dtype=torch.bool)  # the event: some value of the run leaves [-R, R]
    tail = torch.zeros(runs, dtype=torch.bool)  # the event the bound counts: some |noise| > R - C_g
    stds = release.participant_stds()
    for g, d in sizes.items():
        noise = stds[g] * torch.randn(runs, T * 3, d, generator=gen, dtype=torch.float64)
        # worst case for the bound: every coordinate of the clipped update at +C_g (a coordinate is <= C_g)
        refused |= ((bounds[g] + noise).abs() > R).flatten(1).any(1)
        tail |= (noise.abs() > R - bounds[g]).flatten(1).any(1)
    rate, tail_rate = float(refused.double().mean()), float(tail.double().mean())
    sd = math.sqrt(0.05 * 0.95 / runs)
    assert rate <= tail_rate <= 0.05 + 4 * sd  # the bound holds
    assert tail_rate >= 0.05 - 4 * sd  # and is tight: P(any of N rare events) ~ N p (1 - (1-p)^N = 0.049 here)
    print(f"R={R:.4f} bound=0.05 simulated: tail events {tail_rate:.4f}, refusals {rate:.4f} over {runs} runs")


def test_server_announces_the_connected_participants_and_sites_size_their_share(monkeypatch):
    """Distributed placement in Flower: m = selected AND connected sites, told to each site (sigma^2/m)."""
    from flwr.app import ConfigRecord

    import mmpfl_flower.strategy as flower_strategy
    from mmpfl_core.federated.client import trainable_state
    from mmpfl_flower.strategy import KitStrategy, to_array_record

    # A Message needs a running Flower run; the content is what this test reads.
    monkeypatch.setattr(flower_strategy, "Message", lambda content, **kw: SimpleNamespace(content=content, **kw))

    job = load_job(**SMOKE, method="dp-fedavg", placement="distributed")
    model = new_model(job)
    core = configured_strategy(job, model)
    state = trainable_state(model)
    kit = KitStrategy(job, core, state, node_sites={10: 0, 11: 1, 12: 2})
    core.before_round(1)
    grid = SimpleNamespace(get_node_ids=lambda: [10, 12])  # site 1's SuperNode is offline
    messages = list(kit.configure_train(1, to_array_record(state), ConfigRecord({"method": "dp-fedavg"}), grid))
    assert kit.selected == [0, 1, 2] and len(messages) == 2  # q = 1 in the smoke preset
    configs = [dict(m.content.config_records["config"]) for m in messages]
    assert all(c["participants"] == 2 for c in configs)
    site = configured_strategy(job, model)  # a SuperNode's own strategy object
    from mmpfl_flower.client_app import TRANSPORT_KEYS  # the real client's split: transport vs release
    site.apply_round_instructions(1, {k: v for k, v in configs[0].items() if k not in TRANSPORT_KEYS})
    sigma = {g: configs[0][f"sigma/{g}"] for g in site.groups}
    assert site.participant_noise_stds() == pytest.approx({g: v / math.sqrt(2) for g, v in sigma.items()})


def test_site_refuses_values_secagg_would_clip():
    settings = FlowerSettings(secagg=True, secagg_clipping_range=1.0)
    check_secagg_values({"w": np.array([0.5, -1.0])}, settings)
    for bad in (np.array([0.5, -1.5]), np.array([np.nan])):
        with pytest.raises(PrivacyError, match="secagg-clipping-range"):
            check_secagg_values({"w": bad}, settings)


# ------------------------------------------------------------------ Ray: equivalence with the in-process engine
def _ray_can_start() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _ray_startup_failure(exc: BaseException) -> bool:
    """True if the chain of causes shows Ray itself failing to start (not an error of the app)."""
    seen = exc
    while seen is not None:
        if "timed out during startup" in str(seen) or type(seen).__module__.startswith("ray"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _run_with_ray_retry(**overrides):
    from mmpfl_flower.simulate import run_flower_simulation
    if not _ray_can_start():
        pytest.skip("Ray is not installed: pip install 'flwr[simulation]'")
    for attempt in (1, 2):  # Ray waits a fixed 30 s for its raylet: a loaded 2-core machine may need a retry
        try:
            return run_flower_simulation(**overrides)[0]
        except RuntimeError as exc:
            if not _ray_startup_failure(exc):
                raise
            if attempt == 2:
                pytest.skip(f"Ray could not start here (twice): {exc!r}")


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("flower")
    return _run_with_ray_retry(**SMOKE, method="fedavg,dp-fedavg", results_dir=str(out))


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("label", ["fedavg", "dp-fedavg"])
def test_flower_simulation_equals_in_process_engine(flower_runs, label):
    from mmpfl_flower.simulate import compare_with_inprocess
    job, run_dir = next((j, r) for j, r in flower_runs if j.method.label == label)
    cmp = compare_with_inprocess(job, run_dir)
    assert cmp["max_abs_diff"] <= 1e-6
    if label == "dp-fedavg":
        assert cmp["epsilon_flower"] is not None and math.isfinite(cmp["epsilon_flower"])
        assert cmp["epsilon_flower"] == pytest.approx(cmp["epsilon_inprocess"], rel=1e-12)
    else:
        assert cmp["epsilon_flower"] is None and cmp["epsilon_inprocess"] is None
    assert cmp["test_accuracy_flower"] == pytest.approx(cmp["test_accuracy_inprocess"], abs=1e-12)
    # Same results layout as the in-process engine: config.json, metrics.csv (its columns first), summary, checkpoint.
    metrics = run_dir.read_metrics(include_private=True)  # counts, losses and bytes are operator-only
    assert "num_clients" not in run_dir.read_metrics().columns
    # The in-process engine's operator-only columns lead private/round_metrics.csv, in its order.
    inprocess_columns = ["round", "num_clients", "train_loss", "bytes_up", "bytes_down", "cum_bytes_up", "cum_bytes_down"]
    private_columns = list(pd.read_csv(run_dir.private_metrics_path, nrows=0).columns)
    assert private_columns[:len(inprocess_columns)] == inprocess_columns
    assert list(run_dir.read_metrics().columns)[0] == "round" and set(inprocess_columns) <= set(metrics.columns)
    assert list(metrics["round"]) == [1, 2] and (metrics["num_responded"] == 3).all()
    history = cmp["inprocess"].history
    assert list(metrics["bytes_up"]) == [r["bytes_up"] for r in history]
    assert run_dir.read_summary()["engine"] == "flower"


def test_dropout_keeps_the_privacy_accounting_and_the_fixed_denominator():
    """DP-FedAvg (server noise): a site that fails mid-round changes neither the ledger entry (rate q,
    multiplier z) nor the denominator qN; the release is the core's aggregate of the survivors."""
    from mmpfl_core.federated.client import ClientUpdate, trainable_state
    from mmpfl_flower.strategy import KitStrategy

    job = load_job(**SMOKE, method="dp-fedavg")
    model = new_model(job)
    state = trainable_state(model)
    gen = torch.Generator().manual_seed(1)
    deltas = [{n: (0.01 * torch.randn(t.shape, generator=gen)).numpy() for n, t in state.items()} for _ in range(3)]
    epsilons, results = [], []
    for failing in (None, 1):
        core = configured_strategy(job, model)
        kit = KitStrategy(job, core, state, node_sites={10: 0, 11: 1, 12: 2})
        kit.selected = [0, 1, 2]
        core.before_round(1)
        replies = [_reply(10 + s, s, deltas[s], 20, error=(s == failing)) for s in range(3)]
        arrays, metrics = kit.aggregate_train(1, replies)
        epsilons.append(core.ledger.epsilon())
        results.append(arrays.to_torch_state_dict())
        if failing is not None:
            assert metrics["num_responded"] == 2 and metrics["num_failed"] == 1
            reference = configured_strategy(job, model)
            reference.before_round(1)
            survivors = [s for s in range(3) if s != failing]
            expected = reference.aggregate(state, [ClientUpdate(s, {}, 20, 2, 1.0) for s in survivors],
                                           [{n: torch.from_numpy(a) for n, a in deltas[s].items()} for s in survivors], 1)
            assert all(torch.equal(results[-1][n], expected[n]) for n in expected)
            assert core.expected_participants == pytest.approx(3.0)  # q N with q = 1: not the 2 who answered
    assert epsilons[0] == epsilons[1] > 0
    assert any(not torch.equal(results[0][n], results[1][n]) for n in results[0])


# ------------------------------------------------------------------ fast: what a real SuperNode sends (issue 21)
def _gate_args(split: bool, **extra) -> str:
    """MM-PFL-ADP arguments whose noise gate splits the groups (a threshold between their SNRs: the bounded
    Fisher split separates them; on the smoke preset 0.03 drowns the patch embeddings, clinical and norm) or,
    ``split=False``, the default gate (on 3 sites at epsilon 8 it keeps every group home)."""
    args = {"proxy_trust": None, "min_gain": 0.0, **extra}
    if split:
        args["noise_gate"] = {"min_snr": 0.03}
    return json.dumps(args)


def _site_context(site: int):
    from flwr.app import Context, RecordDict
    return Context(run_id=1, node_id=100 + site, node_config={"partition-id": site}, state=RecordDict(), run_config={})


def _old_filter_apply(strategy, round_index, instructions):
    """The pre-issue-21 SuperNode (BROKEN, for the distinguishing test): it kept only ``clip_norm``,
    ``participants`` and ``sigma/*`` of the server's instructions and installed them without the release's
    checks, so the noise gate's drowned groups never reached it."""
    from mmpfl_core.privacy.release import RoundRelease
    kept = {k: v for k, v in instructions.items() if k in ("clip_norm", "participants") or k.startswith("sigma/")}
    strategy._round, strategy._dropped = round_index, 0
    strategy.drowned = frozenset()
    from mmpfl_core.federated.dp_strategies import DPFedAvg
    DPFedAvg._set_bounds(strategy, float(kept["clip_norm"]))  # bounds over ALL groups: it knew no gate
    strategy._sigmas = {g: float(kept[f"sigma/{g}"]) for g in strategy.groups}
    forged = object.__new__(RoundRelease)  # no validation: what the old site did with what it kept
    participants = int(kept["participants"]) if "participants" in kept else None
    for key, value in dict(round=round_index, placement=strategy.placement, clip_norm=strategy.clip_norm,
                           clip_bounds=dict(strategy.clip_bounds), sigmas=dict(strategy._sigmas), drowned=frozenset(),
                           participants=participants, expected_participants=strategy.expected_participants,
                           sample_rate=strategy.sample_rate, noise_multiplier=strategy.update_noise_multiplier,
                           count_noise_multiplier=0.0, noise=strategy.noise,
                           groups=tuple(sorted(strategy.groups))).items():
        object.__setattr__(forged, key, value)
    strategy.round_release, strategy._release_from_server = forged, True
    strategy._announced = participants


def _violations(sent, release, groups) -> list[str]:
    """What an adversary (the server, or anyone behind SecAgg+ with m = 1) could object to in one site's reply.

    * a group nobody releases (drowned) must not leave the site at all;
    * server placement: every sent group is clipped to C_g (the trusted server adds the noise);
    * distributed placement: a sent group g is c + n with ||c|| <= C_g and n ~ N(0, (sigma_g^2 / m) I_{d_g}),
      so the noise norm lies in [||sent_g|| - C_g, ||sent_g|| + C_g], which must meet the chi-square band
      (two-sided 1e-6) of the accounted share sigma_g / sqrt(m).
    """
    from scipy.stats import chi2

    out = []
    for g in sorted(release.drowned):
        leaked = [n for n in groups[g] if n in sent]
        if leaked:
            out.append(f"drowned group {g} sent: {leaked}")
    shares = release.participant_stds()
    for g in release.released_groups:
        names = [n for n in groups[g] if n in sent]
        if not names:
            continue
        norm = math.sqrt(sum(float(np.sum(np.asarray(sent[n], np.float64) ** 2)) for n in names))
        d = sum(int(np.asarray(sent[n]).size) for n in names)
        if release.placement.value == "server":
            if norm > release.clip_bounds[g] * (1 + 1e-5):
                out.append(f"group {g}: norm {norm:.4g} > C_g {release.clip_bounds[g]:.4g}")
            continue
        s = shares[g]
        low, high = s * math.sqrt(chi2.ppf(1e-6, d)), s * math.sqrt(chi2.ppf(1 - 1e-6, d))
        if norm + release.clip_bounds[g] < low or norm - release.clip_bounds[g] > high:
            out.append(f"group {g}: noise norm in [{norm - release.clip_bounds[g]:.4g}, {norm + release.clip_bounds[g]:.4g}]"
                       f" outside the band [{low:.4g}, {high:.4g}] of the share sigma_g/sqrt(m) = {s:.4g}")
    return out


@pytest.mark.parametrize("placement, split, site_kind", [
    *((p, split, kind) for p, split in (("server", True), ("distributed", True), ("distributed", False))
      for kind in ("real-client", "old-filter")),
    ("distributed", True, "no-noise-share"), ("distributed", True, "share-for-m=1")])
def test_a_supernode_sends_only_what_the_release_accounts(monkeypatch, placement, split, site_kind):
    """The REAL client step (client_app._train_step, as the train handler calls it) on the server's release
    record: drowned groups never leave the site and what is sent carries the accounted noise share. The
    pre-issue-21 site (the old hand-picked filter) must be flagged in every setting: it sent the gated
    groups (with distributed placement and the default gate: every tensor, with noise std 0); so must a
    site that adds no noise share, or a share sized for m = 1 instead of the m announced."""
    from mmpfl_core.federated.client import trainable_state
    from mmpfl_flower import client_app
    from mmpfl_flower.task import state_to_numpy

    job = load_job(**SMOKE, method="mm-pfl-adp", placement=placement, method_args=_gate_args(split))
    model = new_model(job)
    server = configured_strategy(job, model)
    state = trainable_state(model)
    server.before_round(1)
    server.announce_participants(3)  # q = 1 on the smoke preset: all three sites, all connected
    record = server.round_instructions(1, state)
    release = server.round_release
    if split:
        assert release.drowned and release.released_groups, release.drowned  # the gate really splits
    else:
        assert release.drowned == frozenset(release.groups)  # the default gate keeps every group home
    site_strategy = client_app._site_objects(job.key(), job)[1]
    if site_kind == "old-filter":
        monkeypatch.setattr(site_strategy, "apply_round_instructions",
                            lambda t, instructions: _old_filter_apply(site_strategy, t, instructions))
    elif site_kind != "real-client":
        factor = 0.0 if site_kind == "no-noise-share" else math.sqrt(3)  # sigma_g / sqrt(m) -> 0 or sigma_g
        real_stds = type(site_strategy).participant_noise_stds
        monkeypatch.setattr(site_strategy, "participant_noise_stds",
                            lambda: {g: v * factor for g, v in real_stds(site_strategy).items()})
    problems = []
    for site in (0, 1):
        sent, metrics = client_app._train_step(job, _site_context(site), state_to_numpy(state),
                                               {"method": job.method.label, "site": site, **record})
        assert metrics["site"] == site
        problems += _violations(sent, release, server.groups)
        if site_kind == "real-client":
            assert site_strategy.round_release == release  # applied whole, nothing recomputed
    if site_kind == "real-client":
        assert problems == []
    else:
        assert problems, "the distinguishing test failed to flag the old hand-picked filter"


def test_the_real_client_refuses_a_release_with_a_missing_or_unknown_key():
    from mmpfl_core.federated.client import trainable_state
    from mmpfl_flower import client_app
    from mmpfl_flower.task import state_to_numpy

    job = load_job(**SMOKE, method="mm-pfl-adp", method_args=_gate_args(True))
    model = new_model(job)
    server = configured_strategy(job, model)
    state = trainable_state(model)
    server.before_round(1)
    record = server.round_instructions(1, state)
    for bad in ({k: v for k, v in record.items() if not k.startswith("drowned/")}, {**record, "surprise": 1.0}):
        with pytest.raises(PrivacyError, match="different strategy configurations"):
            client_app._train_step(job, _site_context(0), state_to_numpy(state),
                                   {"method": job.method.label, "site": 0, **bad})


# ------------------------------------------------------------------ Ray: MM-PFL-ADP's gated release through the app
@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flower_mm_pfl_adp_split_gate_releases_only_accounted_noise(tmp_path, monkeypatch):
    """Through the ServerApp and ClientApps on the simulation engine, MM-PFL-ADP (server placement) with a
    gate that keeps some groups home: no site sends a drowned group, no drowned group changes in the
    released model, and every released tensor differs from the noiseless aggregate theta + sum(sent) / qN
    by noise of the accounted scale sigma_g / qN (chi-square band, two-sided 1e-6, per tensor)."""
    from scipy.stats import chi2

    from mmpfl_flower.strategy import KitStrategy

    seen: list[dict] = []
    real_parse, real_aggregate = KitStrategy._parse, KitStrategy.aggregate_train

    def parse(self, server_round, replies):  # the server's view: what each site sent
        parsed = real_parse(self, server_round, replies)
        seen.append({"round": server_round, "sent": [s for _, s in parsed]})
        return parsed

    def aggregate(self, server_round, replies):
        before = {n: t.clone() for n, t in self.global_state.items()}
        out = real_aggregate(self, server_round, replies)
        seen[-1].update(before=before, after={n: t.clone() for n, t in self.global_state.items()},
                        release=self.core.round_release, groups=self.core.groups)
        return out

    # The ServerApp runs in this process (the ClientApps in Ray actors): spy on what reaches the server.
    monkeypatch.setattr(KitStrategy, "_parse", parse)
    monkeypatch.setattr(KitStrategy, "aggregate_train", aggregate)
    # Reproducible (NOT private) noise only so that the in-process engine can be compared bit for bit below.
    runs = _run_with_ray_retry(**SMOKE, method="mm-pfl-adp", method_args=_gate_args(True, noise="reproducible-insecure"),
                               results_dir=str(tmp_path))
    assert [r["round"] for r in seen] == [1, 2]
    drowned_checked = released_checked = 0
    for r in seen:
        release, groups, before, after = r["release"], r["groups"], r["before"], r["after"]
        assert release.drowned and release.released_groups and len(r["sent"]) == 3
        for g in release.drowned:
            for n in groups[g]:
                assert all(n not in s for s in r["sent"]), f"round {r['round']}: a site sent drowned {n}"
                assert torch.equal(after[n], before[n]), f"round {r['round']}: drowned {n} changed"
                drowned_checked += 1
        qN = release.expected_participants
        for g in release.released_groups:
            for n in groups[g]:
                total = sum((s[n].double() for s in r["sent"] if n in s), torch.zeros(before[n].shape, dtype=torch.float64))
                residual = after[n].double() - before[n].double() - total / qN  # = noise / qN
                stat = float(((residual * qN / release.sigmas[g]) ** 2).sum())
                d = residual.numel()
                assert chi2.ppf(1e-6, d) <= stat <= chi2.ppf(1 - 1e-6, d), (r["round"], n, stat, d)
                released_checked += 1
    assert drowned_checked and released_checked
    summary = runs[0][1].read_summary()
    assert summary["engine"] == "flower" and 0 < summary["privacy"]["epsilon"] < math.inf
    # The same release as the in-process engine (one object, built by the server, applied whole by the sites).
    from mmpfl_flower.simulate import compare_with_inprocess
    cmp = compare_with_inprocess(*runs[0])
    assert cmp["max_abs_diff"] <= 1e-6
    assert cmp["epsilon_flower"] == pytest.approx(cmp["epsilon_inprocess"], rel=1e-12)
    print(f"mm-pfl-adp split gate, Flower vs in-process: max |diff| = {cmp['max_abs_diff']:.3g}, "
          f"epsilon {cmp['epsilon_flower']:.6g} vs {cmp['epsilon_inprocess']:.6g}")


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flower_mm_pfl_adp_distributed_secagg_keeps_drowned_groups_home(tmp_path, monkeypatch):
    """Distributed placement through SecAgg+ (m = 3 announced): the sites' fixed-length vectors carry zeros in
    the slots of drowned groups, the secure sum of those slots is exactly zero, the drowned groups do not
    change, the released ones do, and the summary states delta + the SecAgg+ refusal probability."""
    from mmpfl_flower.strategy import KitStrategy

    seen: list[dict] = []
    real = KitStrategy.apply_secure_sum

    def secure_sum(self, server_round, total, num_participants, train_losses):
        before = {n: t.clone() for n, t in self.global_state.items()}
        real(self, server_round, total, num_participants, train_losses)
        seen.append(dict(round=server_round, total=total, m=num_participants, before=before, release=self.core.round_release,
                         after={n: t.clone() for n, t in self.global_state.items()}, groups=self.core.groups))

    monkeypatch.setattr(KitStrategy, "apply_secure_sum", secure_sum)
    runs = _run_with_ray_retry(**{**SMOKE, "num_rounds": 1}, method="mm-pfl-adp", placement="distributed",
                               method_args=_gate_args(True), results_dir=str(tmp_path))
    assert [r["round"] for r in seen] == [1] and seen[0]["m"] == 3 and seen[0]["release"].participants == 3
    r = seen[0]
    release, groups = r["release"], r["groups"]
    assert release.drowned and release.released_groups
    for g in release.drowned:
        for n in groups[g]:
            assert not bool(torch.any(r["total"][n] != 0)) and torch.equal(r["after"][n], r["before"][n]), n
    assert all(not torch.equal(r["after"][n], r["before"][n]) for g in release.released_groups for n in groups[g])
    summary = runs[0][1].read_summary()
    assert summary["flower"]["secagg"] is True
    assert summary["flower"]["delta_with_secagg_refusal"] == pytest.approx(1e-5 + 1e-9, rel=1e-12)
    assert 0 <= summary["flower"]["secagg_refusal_bound_max"] <= 1e-9


def test_the_server_never_moves_a_drowned_group_whatever_a_site_sends():
    """Server half, defence in depth: a reply that carries a drowned group (a site on another configuration,
    or a forged reply) is summed by the strategy but the release leaves every drowned group as it was; the
    released groups still move."""
    from mmpfl_core.federated.client import trainable_state
    from mmpfl_flower.strategy import KitStrategy

    job = load_job(**SMOKE, method="mm-pfl-adp", method_args=_gate_args(True))
    model = new_model(job)
    core = configured_strategy(job, model)
    state = trainable_state(model)
    kit = KitStrategy(job, core, state, node_sites={10: 0, 11: 1, 12: 2})
    kit.selected = [0, 1, 2]
    core.before_round(1)
    core.round_instructions(1, state)
    release = core.round_release
    assert release.drowned
    gen = torch.Generator().manual_seed(3)
    replies = [_reply(10 + s, s, {n: (0.01 * torch.randn(t.shape, generator=gen)).numpy() for n, t in state.items()}, 20)
               for s in range(3)]
    arrays, metrics = kit.aggregate_train(1, replies)
    assert metrics["num_responded"] == 3
    after = arrays.to_torch_state_dict()
    drowned = [n for g in release.drowned for n in core.groups[g]]
    released = [n for g in release.released_groups for n in core.groups[g]]
    assert all(torch.equal(after[n], state[n]) for n in drowned)
    assert all(not torch.equal(after[n], state[n]) for n in released)


@pytest.mark.parametrize("caller", [None, "1", "2"])
def test_ray_workers_train_single_threaded_whatever_the_caller_sets(monkeypatch, tmp_path, caller):
    """compare_with_inprocess trains its reference with one torch thread; the Ray workers must too, or the engines
    reduce floats in another order (OMP_NUM_THREADS=2 in the caller's environment put notebook 08's models 1e-3
    apart). Workers inherit the environment at the simulation's start: it must say 1 there, and the caller's own
    setting must come back afterwards."""
    import flwr.simulation

    from mmpfl_flower import client_app, server_app, simulate
    seen = {}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if caller is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, caller)
    monkeypatch.setattr(flwr.simulation, "run_simulation",
                        lambda **kwargs: seen.update({k: simulate.os.environ.get(k)
                                                      for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}))
    monkeypatch.setattr(server_app, "make_server_app", lambda **overrides: None)
    monkeypatch.setattr(client_app, "make_client_app", lambda **overrides: None)
    monkeypatch.setattr(simulate, "RunDirectory", lambda path: path)  # nothing ran, so there is no run directory
    simulate.run_flower_simulation(**SMOKE, method="fedavg", results_dir=str(tmp_path))
    assert seen == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        assert simulate.os.environ.get(key) == caller
