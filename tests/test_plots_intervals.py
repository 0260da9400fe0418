"""The point-and-interval figure draws each row where the table puts it: point, interval ends, label, colour."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from mmpfl_core.plots.intervals import plot_arm_intervals


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "arm": ["base", "local", "local", "private"],
            "rounds": [0, 20, 100, 50],
            "personal_accuracy": [0.61, 0.64, 0.66, 0.71],
            "low": [0.58, 0.62, 0.63, 0.69],
            "high": [0.64, 0.67, 0.69, 0.73],
            "patient_epsilon_max": [0.0, 0.0, 0.0, 8.0],
        }
    )


def _drawn(ax) -> dict[float, tuple[float, float, float]]:
    """y -> (point, interval low, interval high), read back from the drawn artists."""
    out = {}
    for container in ax.containers:  # ErrorbarContainer.lines = (data line, caps, (x-error LineCollection,))
        data_line, _, (bars,) = container.lines
        xs, ys = data_line.get_data()
        for x, yy, seg in zip(xs, ys, bars.get_segments(), strict=True):
            out[float(yy)] = (float(x), float(seg[0][0]), float(seg[1][0]))
    return out


def test_each_row_is_drawn_at_its_point_and_interval_first_row_on_top():
    table = _table()
    ax = plot_arm_intervals(table, labels={"base": "public model", "private": "the method"})
    drawn = _drawn(ax)
    assert len(drawn) == len(table)
    for i, row in table.iterrows():
        point, low, high = drawn[-float(i)]
        assert (point, low, high) == pytest.approx((row["personal_accuracy"], row["low"], row["high"]))
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    # a repeated arm carries its rounds; a unique one does not; labels map through
    assert ticks == ["public model", "local (20 rounds)", "local (100 rounds)", "the method"]
    assert list(ax.get_yticks()) == [0, -1, -2, -3]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["no DP", "patient epsilon 8"]
    plt.close("all")


def test_private_rows_get_their_own_colour():
    table = _table()
    ax = plot_arm_intervals(table)
    colours = {matplotlib.colors.to_hex(c.lines[0].get_color()) for c in ax.containers}
    assert len(ax.containers) == 2 and len(colours) == 2  # grey for no DP, one colour for epsilon 8
    assert matplotlib.colors.to_hex("grey") in colours
    plt.close("all")


def test_missing_columns_and_empty_tables_are_named():
    with pytest.raises(ValueError, match=r"\['high'\]"):
        plot_arm_intervals(_table().drop(columns="high"))
    with pytest.raises(ValueError, match="empty"):
        plot_arm_intervals(_table().iloc[:0])
