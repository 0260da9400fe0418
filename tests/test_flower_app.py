"""The Flower app (flower_app/, issue 7): config mapping, reply validation, SecAgg+ range checks (fast),
and equivalence with the in-process engine on Flower's Ray simulation engine (one Ray start-up).

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
def test_secagg_range_must_cover_clip_plus_noise_tail():
    job = load_job(**SMOKE, method="dp-fedavg", placement="distributed")
    model = new_model(job)
    core = configured_strategy(job, model)
    core.before_round(1)
    core.announce_participants(2)  # SecAgg+ rounds have m >= 2 announced participants, each adding sigma^2/m
    instructions = core.round_instructions(1, {n: p.detach() for n, p in model.named_parameters()})
    assert instructions["participants"] == 2
    check_secagg_range(core, instructions, job.flower)  # default range 8 covers C=0.5 + 6 std here
    sigma = max(v for k, v in instructions.items() if k.startswith("sigma/"))
    need = instructions["clip_norm"] + 6 * sigma / math.sqrt(2)
    with pytest.raises(ConfigError, match="would silently clip"):
        check_secagg_range(core, instructions, FlowerSettings(secagg=True, secagg_clipping_range=need * 0.9))
    with pytest.raises(ConfigError, match="min_participants"):  # the m_min shares are gone (issue 14)
        configured_strategy(load_job(**SMOKE, method="dp-fedavg", placement="distributed",
                                     method_args=json.dumps({"min_participants": 2})), model)


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
    site.apply_round_instructions(1, {k: float(v) for k, v in configs[0].items()
                                      if k in ("clip_norm", "participants") or k.startswith("sigma/")})
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


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory):
    if not _ray_can_start():
        pytest.skip("Ray is not installed: pip install 'flwr[simulation]'")
    from mmpfl_flower.simulate import run_flower_simulation
    out = tmp_path_factory.mktemp("flower")
    for attempt in (1, 2):  # Ray waits a fixed 30 s for its raylet: a loaded 2-core machine may need a retry
        try:
            runs, _ = run_flower_simulation(**SMOKE, method="fedavg,dp-fedavg", results_dir=str(out))
            return runs
        except RuntimeError as exc:
            if not _ray_startup_failure(exc):
                raise
            if attempt == 2:
                pytest.skip(f"Ray could not start here (twice): {exc!r}")


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
