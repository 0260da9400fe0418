"""The pooled learning curve (mmpfl_core.learning_curve) and its figure (mmpfl_core.plots.learning_curve).

What a broken curve would look like, and the test that catches it: a subset drawn from val or test patients
(leakage: the spy on the training call checks subject ids), a subset that ignores n or the seed, a global
RNG (same seed, same table), and a curve that does not rise with data on an easy cohort (checked to fail
when the draw is broken to always train on one patient).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

import mmpfl_core.learning_curve as lc
from mmpfl_core.centralized import TrainingRecipe
from mmpfl_core.data.federation import FederationConfig, build_federation
from mmpfl_core.data.synthetic import SyntheticCohortConfig
from mmpfl_core.errors import ConfigError
from mmpfl_core.models.presets import create_model
from mmpfl_core.plots import plot_learning_curve

#: A one-block ViT with 16-wide tokens on 16-pixel images: the easy cohort (difficulty 0) separates quickly.
TINY = dict(image_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
RECIPE = TrainingRecipe(epochs=2, batch_size=16, lr=1e-2, warmup_epochs=0.0)
#: Long enough that the pooled 156 patients learn the easy cohort (measured: 0.77-0.85 against 0.29-0.33 at 4).
GAIN_RECIPE = TrainingRecipe(epochs=10, batch_size=16, lr=1e-2, warmup_epochs=0.0)


@pytest.fixture(scope="module")
def easy_federation():
    return build_federation(SyntheticCohortConfig(num_subjects=240, image_size=16, difficulty=0.0, seed=3),
                            FederationConfig(num_sites=3, alpha=float("inf"), public_size=0, seed=3))


def _factory(seed: int):
    return create_model("tiny", seed=seed, **TINY)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every cohort the curve trains on (the real training still runs)."""
    seen: list = []
    real = lc.train_centralized

    def spy(model, train, recipe, **kwargs):
        seen.append(train)
        return real(model, train, recipe, **kwargs)

    monkeypatch.setattr(lc, "train_centralized", spy)
    return seen


def test_site_training_sizes_count_the_train_splits(easy_federation):
    sizes = lc.site_training_sizes(easy_federation)
    assert list(sizes.index) == [s.name for s in easy_federation.sites]
    assert sizes.tolist() == [len(s.train) for s in easy_federation.sites]
    assert sizes.sum() == len(lc.pooled_training_cohort(easy_federation))


def test_table_shape_columns_and_the_trained_subsets(easy_federation, monkeypatch):
    seen = _spy(monkeypatch)
    pooled = len(lc.pooled_training_cohort(easy_federation))
    curve = lc.pooled_learning_curve(easy_federation, _factory, RECIPE, [pooled, 5, 20], [0, 1])
    assert list(curve.columns) == ["n", "seed", "epochs", "accuracy", "balanced_accuracy", "seconds"]
    assert curve[["n", "seed"]].values.tolist() == [[5, 0], [5, 1], [20, 0], [20, 1], [pooled, 0], [pooled, 1]]
    assert curve["accuracy"].between(0, 1).all() and curve["balanced_accuracy"].between(0, 1).all()
    train_ids = {i for s in easy_federation.sites for i in s.train.subject_ids.tolist()}
    held_out = {i for s in easy_federation.sites for split in (s.val, s.test) for i in split.subject_ids.tolist()}
    assert len(seen) == 6
    by_run = {}
    for cohort, (n, seed) in zip(seen, [(n, s) for s in (0, 1) for n in (5, 20, pooled)], strict=True):
        ids = cohort.subject_ids.tolist()
        assert len(ids) == len(set(ids)) == n, "n distinct patients, drawn without replacement"
        assert set(ids) <= train_ids and not set(ids) & held_out, "never a val or test patient"
        by_run[n, seed] = set(ids)
    assert by_run[pooled, 0] == train_ids
    assert by_run[5, 0] != by_run[5, 1] and by_run[20, 0] != by_run[20, 1], "seeds draw different subsets"
    assert by_run[5, 0] < by_run[20, 0], "one seed's subsets are nested"


def test_the_same_seed_gives_the_same_table(easy_federation):
    a = lc.pooled_learning_curve(easy_federation, _factory, RECIPE, [8, 30], [4])
    b = lc.pooled_learning_curve(easy_federation, _factory, RECIPE, [8, 30], [4])
    cols = ["n", "seed", "epochs", "accuracy", "balanced_accuracy"]
    assert a[cols].equals(b[cols])


def test_min_steps_gives_small_subsets_more_epochs(easy_federation):
    curve = lc.pooled_learning_curve(easy_federation, _factory, RECIPE, [8, 100], [0], min_steps=12)
    # 8 patients: 1 step an epoch -> 12 epochs; 100 patients: 7 steps an epoch -> max(2, ceil(12/7)) = 2
    assert curve.set_index("n")["epochs"].to_dict() == {8: 12, 100: 2}


@pytest.mark.parametrize(
    ("sizes", "seeds", "match"),
    [([], [0], "sizes is empty"), ([0, 5], [0], r"sizes \[0\]"), ([5, 100_000], [0], r"sizes \[100000\] are larger"),
     ([5, 5], [0], "repeat a size"), ([5], [], "seeds is empty"), ([5], [1, 1], "repeat a seed")],
)
def test_bad_inputs_name_the_problem(easy_federation, sizes, seeds, match):
    with pytest.raises(ConfigError, match=match):
        lc.pooled_learning_curve(easy_federation, _factory, RECIPE, sizes, seeds)


def test_bad_min_steps_and_geometric_sizes():
    with pytest.raises(ConfigError, match="min_steps"):
        lc._check_inputs([5], [0], 10, -1)
    with pytest.raises(ConfigError, match="smallest"):
        lc.geometric_sizes(0, 10, 3)
    assert lc.geometric_sizes(8, 910, 5) == [8, 26, 85, 279, 910]
    assert lc.geometric_sizes(3, 4, 5) == [3, 4]


def _gain(federation) -> float:
    """Mean accuracy over 2 seeds at the pooled size minus that at 4 patients."""
    pooled = len(lc.pooled_training_cohort(federation))
    curve = lc.pooled_learning_curve(federation, _factory, GAIN_RECIPE, [4, pooled], [0, 1], min_steps=20)
    means = lc.learning_curve_summary(curve).set_index("n")["mean"]
    return float(means[pooled] - means[4])


def test_more_data_helps_on_an_easy_cohort_and_the_check_can_fail(easy_federation, monkeypatch):
    assert _gain(easy_federation) > 0.2
    # Broken drawing (every run trains on one patient, whatever n): the same check must fail.
    real = lc.draw_training_subset
    monkeypatch.setattr(lc, "draw_training_subset", lambda pooled, n, seed: real(pooled, 1, seed))
    assert not _gain(easy_federation) > 0.2


def test_summary_gives_a_seed_interval():
    import pandas as pd

    curve = pd.DataFrame({"n": [5, 5, 5, 9], "seed": [0, 1, 2, 0], "accuracy": [0.5, 0.6, 0.7, 0.8]})
    summary = lc.learning_curve_summary(curve).set_index("n")
    assert summary.loc[5, "seeds"] == 3 and summary.loc[5, "mean"] == pytest.approx(0.6)
    assert summary.loc[5, "low"] < 0.6 < summary.loc[5, "high"]
    assert np.isnan(summary.loc[9, "low"])
    with pytest.raises(ConfigError, match="no column 'auroc'"):
        lc.learning_curve_summary(curve, "auroc")


def test_plot_marks_every_site_and_the_pooled_size():
    import pandas as pd

    curve = pd.DataFrame({"n": [4, 4, 40, 40], "seed": [0, 1, 0, 1], "accuracy": [0.4, 0.5, 0.7, 0.8]})
    sizes = pd.Series({"A": 4, "B": 10, "C": 26})
    ax = plot_learning_curve(curve, sizes, chance=0.45)
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.texts] == ["A", "B", "C"]
    assert any(list(line.get_xdata()) == [40, 40] for line in ax.lines), "a vertical line at the pooled size"
    assert len(ax.collections) == 2, "seed points and the interval band"
    plt.close("all")
    with pytest.raises(ConfigError, match="site_sizes is empty"):
        plot_learning_curve(curve, pd.Series(dtype="int64"))


def _record_keys(source: str) -> tuple[set[str], set[str]]:
    """The keys a notebook cell passes to record_results as released values and as private ones."""
    import ast

    released: set[str] = set()
    private: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "record_results":
            released |= {k.value for k in node.args[1].keys if isinstance(k, ast.Constant)}
            for kw in node.keywords:
                if kw.arg == "private":
                    private |= {k.value for k in kw.value.keys if isinstance(k, ast.Constant)}
    return released, private


def test_notebook_00_keeps_the_non_private_curve_out_of_its_release():
    """The curve trains on every site's patients without DP: its numbers go to private/ only."""
    from pathlib import Path

    import nbformat

    path = Path(__file__).resolve().parent.parent / "notebooks" / "00_data_and_institutions.ipynb"
    source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    released, private = _record_keys(source)
    assert "learning_curve_mean_by_n" in private, "the notebook records its curve (operator only)"
    assert not {k for k in released if "learning_curve" in k}, "a learning-curve number is in the released record"
    # The check can fail: the same call with the curve among the released values is flagged.
    leaky, _ = _record_keys('record_results("00", {"learning_curve_mean_by_n": 1}, None, private={})')
    assert {k for k in leaky if "learning_curve" in k}
