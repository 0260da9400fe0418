"""Dynamic personalisation masks: which parameter groups each site keeps local, and when that changes.

What it is for: a site's mask is the set of its *personal* parameter groups; every other group is
*shared* (uploaded and averaged). Masks partition the model's groups exactly. They are recomputed
from mask scores (KL scores, :mod:`.kl_scores`) every ``update_every`` rounds a site takes part in,
with hysteresis so that a score wobbling around the threshold does not flip a group every round.

Two pieces, reusable by any strategy (FedAvg with masks, MM-PFL-ADP):

* :class:`MaskSchedule`: the validated, frozen configuration.
* :class:`PersonalizationMasks`: per-site mask state (groups only, no tensors), JSON-checkpointable.
* :class:`DynamicKLMasks`: the two above plus KL scoring on the dataset its caller passes (a site's
  validation split, or the public set under patient-level DP, docs/DESIGN.md 4.5) and the optional private
  score release (:mod:`.release`).

Noise-aware masks: every update may pass ``forced_personal``, groups a caller has decided must stay
personal this round from PUBLIC information only (the noise gate of :mod:`.noise_gate`: groups whose
release would be drowned by the DP noise). They are personal whatever the scores say, they are not
scored (that is where the KL pass's time goes), and ``min_shared_groups`` does not override them: if
the noise drowns every group, every group stays local. Only the remaining groups follow the scores.

It must never send a site's exact scores or mask anywhere; strategies decide what leaves the site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..data.contract import CohortDataset
from ..errors import ConfigError, check_range
from ..seeding import Stream, torch_generator
from .kl_scores import kl_group_scores
from .release import ScoreRelease

__all__ = ["DynamicKLMasks", "MaskSchedule", "PersonalizationMasks"]

MaskMode = Literal["threshold", "top_fraction"]


@dataclass(frozen=True)
class MaskSchedule:
    """How masks are chosen from scores.

    * ``threshold``: a shared group turns personal when its score exceeds ``threshold * (1 + h)``;
      a personal group returns to shared only when its score falls below ``threshold * (1 - h)``.
    * ``top_fraction``: the ``round(f * n)`` highest-scoring eligible groups (score > 0) are
      personal, f = ``top_fraction``. Hysteresis is a score margin: a currently personal group
      competes with score * (1 + h), a shared one with score * (1 - h).
    """

    mode: MaskMode = "threshold"
    threshold: float = 1e-3  # nats per validation sample
    top_fraction: float = 0.25
    update_every: int = 1  # recompute a site's mask when >= this many rounds passed since its last
    hysteresis: float = 0.1  # h in [0, 1)
    always_shared: tuple[str, ...] = ()
    always_personal: tuple[str, ...] = ()
    min_shared_groups: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("threshold", "top_fraction"):
            raise ConfigError(f"masks.mode={self.mode!r} is unknown; use 'threshold' or 'top_fraction'.")
        check_range("masks.threshold", self.threshold, low=0.0)
        check_range("masks.top_fraction", self.top_fraction, low=0.0, high=1.0)
        check_range("masks.update_every", self.update_every, low=1)
        check_range("masks.hysteresis", self.hysteresis, low=0.0, high=1.0, high_inclusive=False)
        check_range("masks.min_shared_groups", self.min_shared_groups, low=0)
        object.__setattr__(self, "always_shared", tuple(self.always_shared))
        object.__setattr__(self, "always_personal", tuple(self.always_personal))
        both = set(self.always_shared) & set(self.always_personal)
        if both:
            raise ConfigError(f"groups {sorted(both)} are both always_shared and always_personal; pick one.")

    def select(
        self,
        groups: Sequence[str],
        scores: Mapping[str, float],
        current: frozenset[str],
        round_index: int,
        forced_personal: frozenset[str] = frozenset(),
    ) -> frozenset[str]:
        """The new personal set from ``scores`` given the current personal set (hysteresis).

        ``forced_personal`` (public, e.g. the noise gate) joins ``always_personal`` for this call and
        overrides ``always_shared`` and ``min_shared_groups``; its groups need no score.
        """
        h = self.hysteresis
        forced = set(self.always_shared) | set(self.always_personal) | set(forced_personal)
        eligible = [g for g in groups if g not in forced]
        if self.mode == "threshold":
            chosen = {
                g
                for g in eligible
                if (scores[g] >= self.threshold * (1 - h) if g in current else scores[g] > self.threshold * (1 + h))
            }
        else:
            k = int(math.floor(self.top_fraction * len(eligible) + 0.5))
            effective = {g: scores[g] * ((1 + h) if g in current else (1 - h)) for g in eligible}
            ranked = sorted((g for g in eligible if scores[g] > 0), key=lambda g: (-effective[g], groups.index(g)))
            chosen = set(ranked[:k])
        # Keep at least min_shared_groups shared: drop the lowest-scoring chosen groups first.
        kept = set(self.always_personal) | set(forced_personal)
        for g in sorted(chosen, key=lambda g: (scores[g], -groups.index(g))):
            if len(groups) - len(chosen) - len(kept) >= self.min_shared_groups:
                break
            chosen.discard(g)
        return frozenset(chosen | kept)


class PersonalizationMasks:
    """Per-site masks (sets of personal groups) with update bookkeeping; no tensors, JSON state.

    Before a site's first update its personal set is ``always_personal``. The hysteresis state is
    the current mask itself (and the round of the last update), both in :meth:`state_dict`.
    """

    def __init__(self, schedule: MaskSchedule | None = None) -> None:
        self.schedule = schedule or MaskSchedule()
        self.groups: tuple[str, ...] | None = None
        self._personal: dict[int, frozenset[str]] = {}
        self._last_update: dict[int, int] = {}
        self._scores: dict[int, dict[str, float]] = {}
        self._changes: dict[int, int] = {}

    def set_groups(self, groups: Sequence[str]) -> None:
        """Fix the ordered group names (once; the same names again is a no-op)."""
        groups = tuple(groups)
        if self.groups is not None:
            if groups != self.groups:
                raise ConfigError(f"mask groups changed from {self.groups} to {groups}; one model per run.")
            return
        unknown = (set(self.schedule.always_shared) | set(self.schedule.always_personal)) - set(groups)
        if unknown:
            raise ConfigError(
                f"mask groups {sorted(unknown)} are not parameter groups of the model; available: {list(groups)}."
            )
        if len(groups) - len(self.schedule.always_personal) < self.schedule.min_shared_groups:
            raise ConfigError(
                f"min_shared_groups={self.schedule.min_shared_groups} cannot hold with "
                f"always_personal={list(self.schedule.always_personal)} and {len(groups)} groups."
            )
        self.groups = groups

    def personal_groups(self, site: int) -> frozenset[str]:
        return self._personal.get(site, frozenset(self.schedule.always_personal))

    def partition(self, site: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(shared groups, personal groups), each in model order; together exactly the groups."""
        if self.groups is None:
            raise ConfigError("mask groups are unknown; call set_groups(model.parameter_groups()) first.")
        personal = self.personal_groups(site)
        return (tuple(g for g in self.groups if g not in personal), tuple(g for g in self.groups if g in personal))

    def due(self, site: int, round_index: int) -> bool:
        """True when the site has never been scored or ``update_every`` rounds have passed."""
        last = self._last_update.get(site)
        return last is None or round_index - last >= self.schedule.update_every

    def update(
        self,
        site: int,
        round_index: int,
        scores: Mapping[str, float],
        forced_personal: frozenset[str] | Sequence[str] = frozenset(),
    ) -> int:
        """Recompute the site's mask from ``scores``; returns how many groups changed side.

        Groups in ``forced_personal``, ``always_personal`` or ``always_shared`` need no score.
        """
        forced_personal = frozenset(forced_personal)
        if self.groups is None:
            self.set_groups(list(scores) + [g for g in forced_personal if g not in scores])
        assert self.groups is not None  # set just above on a first update
        unknown = forced_personal - set(self.groups)
        if unknown:
            raise ConfigError(f"forced_personal groups {sorted(unknown)} are not mask groups {list(self.groups)}.")
        needed = (
            set(self.groups) - forced_personal - set(self.schedule.always_personal) - set(self.schedule.always_shared)
        )
        missing = needed - set(scores)
        if missing:
            raise ConfigError(f"scores miss groups {sorted(missing)}; score every group not forced to a side.")
        full = {g: float(scores.get(g, 0.0)) for g in self.groups}  # unscored groups are decided without a score
        old = self.personal_groups(site)
        new = self.schedule.select(self.groups, full, old, round_index, forced_personal)
        self._personal[site] = new
        self._last_update[site] = int(round_index)
        self._scores[site] = {g: float(scores[g]) for g in self.groups if g in scores}
        changed = len(old ^ new)
        self._changes[int(round_index)] = self._changes.get(int(round_index), 0) + changed
        return changed

    def changes_in(self, round_index: int) -> int:
        return self._changes.get(int(round_index), 0)

    def scores(self, site: int) -> dict[str, float]:
        """The scores the site's current mask was chosen from (site-side diagnostics only)."""
        return dict(self._scores.get(site, {}))

    def state_dict(self) -> dict[str, Any]:
        return {
            "groups": None if self.groups is None else list(self.groups),
            "personal": {str(s): sorted(p) for s, p in self._personal.items()},
            "last_update": {str(s): r for s, r in self._last_update.items()},
            "scores": {str(s): v for s, v in self._scores.items()},
            "changes": {str(r): c for r, c in self._changes.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.groups = None if state["groups"] is None else tuple(state["groups"])
        self._personal = {int(s): frozenset(p) for s, p in state["personal"].items()}
        self._last_update = {int(s): int(r) for s, r in state["last_update"].items()}
        self._scores = {int(s): {g: float(v) for g, v in d.items()} for s, d in state["scores"].items()}
        self._changes = {int(r): int(c) for r, c in state["changes"].items()}


class DynamicKLMasks:
    """KL-scored dynamic masks: scoring on the site's validation data, optional private release, masks.

    ``maybe_update(site, round, model, global_state, trained_state, val)`` scores the groups when the
    site is due (:meth:`PersonalizationMasks.due`), releases the scores through ``release`` if one is
    configured (noise from the stream ``(seed, 41, round, site)``, so resumes are bit-identical), and
    updates the mask. With ``release=None`` the exact scores are used: right only without a server
    to hide them from, or with a trusted aggregator (``server`` placement; see :mod:`.release`).
    """

    def __init__(
        self,
        schedule: MaskSchedule | None = None,
        *,
        release: ScoreRelease | None = None,
        score_batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        check_range("masks.score_batch_size", score_batch_size, low=1)
        self.masks = PersonalizationMasks(schedule)
        self.release, self.score_batch_size, self.seed = release, int(score_batch_size), int(seed)
        self.param_groups: dict[str, list[str]] | None = None
        self._sizes: dict[str, int] = {}

    def set_param_groups(
        self, param_groups: Mapping[str, Sequence[str]], sizes: Mapping[str, int] | None = None
    ) -> None:
        """Learn the model's ordered groups (and scalars per group, for reporting)."""
        self.masks.set_groups(list(param_groups))
        self.param_groups = {g: list(n) for g, n in param_groups.items()}
        if sizes is not None:
            self._sizes = {g: int(sizes[g]) for g in self.param_groups}

    def configure_from_model(self, model: nn.Module) -> None:
        """``set_param_groups`` from a :class:`~mmpfl_core.models.vit.MultiModalViT` (idempotent)."""
        if self.param_groups is None:
            self.set_param_groups(model.parameter_groups(), model.group_sizes())  # type: ignore[operator]

    def personal_groups(self, site: int) -> frozenset[str]:
        return self.masks.personal_groups(site)

    def names_of(self, groups: frozenset[str] | Sequence[str]) -> set[str]:
        """Parameter names of ``groups`` (empty while the model's groups are unknown)."""
        if self.param_groups is None:
            return set()
        return {n for g in groups for n in self.param_groups[g]}

    def personal_names(self, site: int) -> set[str]:
        return self.names_of(self.personal_groups(site))

    def maybe_update(
        self,
        site: int,
        round_index: int,
        model: nn.Module,
        global_state: Mapping[str, torch.Tensor],
        trained_state: Mapping[str, torch.Tensor],
        val: CohortDataset,
        forced_personal: frozenset[str] = frozenset(),
    ) -> bool:
        """Score and update the site's mask if it is due; True when it was recomputed.

        Only groups whose side is not fixed (``always_*`` or the public ``forced_personal``) are
        scored; when none is left, no forward pass runs at all.
        """
        self.configure_from_model(model)
        if not self.masks.due(site, round_index):
            return False
        schedule = self.masks.schedule
        fixed = set(forced_personal) | set(schedule.always_personal) | set(schedule.always_shared)
        assert self.param_groups is not None, "call set_param_groups() before maybe_update()"
        to_score = {g: names for g, names in self.param_groups.items() if g not in fixed}
        scores: dict[str, float] = {}
        if to_score:
            scores = kl_group_scores(
                model, global_state, trained_state, val, to_score, batch_size=self.score_batch_size
            )
            if self.release is not None:
                scores = self.release.apply(scores, torch_generator(self.seed, Stream.SCORE_RELEASE, round_index, site))
        self.masks.update(site, round_index, scores, forced_personal)
        return True

    def personal_fraction(self, sites: Sequence[int]) -> float:
        """Mean over ``sites`` of the share of scalars in personal groups (0 before groups are known)."""
        if not sites or not self._sizes:
            return 0.0
        total = sum(self._sizes.values())
        return float(sum(sum(self._sizes[g] for g in self.personal_groups(s)) / total for s in sites) / len(sites))

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.state_dict(), "param_groups": self.param_groups, "sizes": self._sizes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])
        self.param_groups = (
            None if state["param_groups"] is None else {g: list(n) for g, n in state["param_groups"].items()}
        )
        self._sizes = {g: int(v) for g, v in state["sizes"].items()}
