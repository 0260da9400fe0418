"""Which run-directory quantities may be released, and which stay private (docs/DESIGN.md 6).

A whitelist: a metrics column or summary key is ``released`` only if it is the accountant's
epsilon, a post-processed quantity (the adaptive clip bound), a setting, or a pooled evaluation
metric of the global / deployed models (released for teaching but outside the DP guarantee,
docs/DESIGN.md 4.6). Everything else (participant counts, exact training losses, byte counters, timing,
per-site metrics and epsilons, masks, node-to-site maps) is private. A new column is private until
someone argues, in this module, why it may be released.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "OPERATOR_ONLY",
    "PRIVATE_TO_SITE",
    "RELEASED",
    "RELEASED_COLUMNS",
    "RELEASED_SUMMARY_KEYS",
    "column_scope",
    "split_row",
    "split_summary",
]

RELEASED, PRIVATE_TO_SITE, OPERATOR_ONLY = "released", "private-to-site", "operator-only"
#: Per-round columns that may be published: accountant output, post-processed clip bound, round.
#: Not ``sample_epsilon_max`` (the max over the sites' DP-SGD epsilons so far): it rises exactly in the
#: rounds the site with the largest epsilon took part in, so publishing it every round publishes that
#: site's participation (which amplification by sampling assumes secret, issue 21). It stays in the
#: operator's round rows; the final value is released once, in the summary
#: (``sample_level_privacy.max_epsilon``).
RELEASED_COLUMNS = frozenset({"round", "epsilon", "clip_norm"})
#: Pooled evaluation of the global / deployed models (released, outside the guarantee: docs/DESIGN.md 4.6).
_POOLED_EVALUATION = re.compile(r"^(global|personal)_(val|test)_[a-z0-9_]+$")
#: Summary keys that may be published (nested dicts are filtered by _PRIVATE_SUBKEYS).
RELEASED_SUMMARY_KEYS = frozenset(
    {
        "strategy",
        "engine",
        "num_rounds",
        "rounds_run",
        "seed",
        "stopped_early",
        "personal_test",
        "global_test",
        "target_accuracy",
        "rounds_to_target",
        "final",
        "privacy",
        "sample_level_privacy",
        "ablation",
        "mask_privacy",
        "flower",
    }
)
_PRIVATE_SUBKEYS = {
    "privacy": {"dropped_updates", "rounds_topped_up"},
    "sample_level_privacy": {"per_site_epsilon"},
    "flower": {"nodes"},
}


def column_scope(name: str) -> str:
    """``released`` for the accountant's epsilon, the clip bound, the round and pooled evaluation
    metrics; ``operator-only`` for everything else (a whitelist: a new column is private until
    someone argues it is released)."""
    return RELEASED if name in RELEASED_COLUMNS or _POOLED_EVALUATION.match(name) else OPERATOR_ONLY


def split_row(row: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(released, private) parts of a metrics row; both keep ``round``."""
    released = {k: v for k, v in row.items() if column_scope(str(k)) == RELEASED}
    private = {"round": row["round"], **{k: v for k, v in row.items() if column_scope(str(k)) != RELEASED}}
    return released, private


def split_summary(summary: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(released, private) parts of a run summary: top-level keys by :data:`RELEASED_SUMMARY_KEYS`,
    ``final`` by :func:`column_scope`, a few nested keys by their meaning (per-site epsilons and
    node-to-site maps are private, since they reveal who took part)."""
    released: dict[str, Any] = {}
    private: dict[str, Any] = {}
    for key, value in summary.items():
        if key not in RELEASED_SUMMARY_KEYS:
            private[key] = value
        elif key == "final" and isinstance(value, Mapping):
            released[key], rest = split_row({"round": None, **value})
            released[key].pop("round")
            rest.pop("round")
            if rest:
                private[key] = rest
        elif key in _PRIVATE_SUBKEYS and isinstance(value, Mapping):
            hidden = _PRIVATE_SUBKEYS[key]
            released[key] = {k: v for k, v in value.items() if k not in hidden}
            if any(k in value for k in hidden):
                private[key] = {k: v for k, v in value.items() if k in hidden}
        else:
            released[key] = value
    return released, private
