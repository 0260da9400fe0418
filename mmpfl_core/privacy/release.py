"""The public state of one round's client-level DP release: ONE object for the server, the sites and the wire.

What it is for: a round of client-level DP (docs/DESIGN.md 4.1-4.4) is fixed by a handful of PUBLIC numbers
(clip bounds, the noise gate's decision, the per-group noise scales, who adds which share, the fixed
denominator, what the accountant is told). :class:`RoundRelease` holds all of them, validates them
together (z_eff is recomputed and checked), and is what a site receives, whole: the in-process
engine builds and uses it in one process, the Flower ServerApp serialises it with
:meth:`RoundRelease.to_record` into the train message and the SuperNode reads it back with
:meth:`RoundRelease.from_record`, which refuses a missing or an unknown key (server and site on
different configurations). A site never recomputes the server's noise scales; it applies this
object. (Two hand-kept copies of it drifted: the Flower site once kept only C, m and sigma_g, lost
the noise gate's decision and released gated groups with no noise; issue 21.)

The mechanism it describes, round t (unit of privacy: one site, add/remove adjacency except local):
    1. Groups: G, partitioned into the released groups S and the *drowned* groups D = G \\ S (the
       noise gate's public decision, :mod:`mmpfl_core.personalization.noise_gate`). A drowned group
       is never sent by any site and never changes in the released model: C_g = sigma_g = 0.
    2. Clipping: a participant clips group g in S to norm C_g with sum_{g in S} C_g^2 = C^2.
    3. Noise of variance sigma_g^2 per coordinate ends up in the released sum of every g in S:
         * ``server``: the trusted server adds N(0, sigma_g^2) to the sum of clipped updates;
         * ``distributed``: each of the m announced participants adds N(0, sigma_g^2 / m) and the
           server, which sees only the secure sum of s <= m arrived shares, tops up
           N(0, sigma_g^2 (m - s) / m) (all of sigma_g^2 when m = 0);
         * ``local``: every participant adds N(0, sigma_g^2) to its own update (replace-one
           adjacency, sensitivity 2C, no amplification).
    4. The server divides by the FIXED denominator qN (expected participants), never by the count.
    5. Accounting: whitening by diag(sigma_g) over S gives the Gaussian mechanism with multiplier
         z_eff = (sum_{g in S} C_g^2 / sigma_g^2)^(-1/2),
       subsampled at rate q (server, distributed; local: z_eff / 2 at rate 1), which
       :func:`~mmpfl_core.privacy.mechanisms.release_accounting` maps to the ledger's inputs.
       A round with S empty releases nothing that depends on a site and is not charged.
    6. Masks (docs/DESIGN.md 4.4): a site's personal groups (its private choice) count as a zero update,
       within the clip bound, so they change nothing above. Under ``server`` placement they are not
       sent (only the trusted server sees which); under ``distributed`` / ``local`` they are sent as
       noise-only placeholders, so the server cannot tell them apart (:meth:`RoundRelease.names_to_send`).

Privacy argument of the object itself: every field is a function of the configuration, the model's
shapes, the accountant's calibration, the public server set and already-released models (the Fisher
allocation, docs/DESIGN.md 4.3) and the announced count m, which the server tells the participants
(``distributed`` only; it is not observable outside the protocol). No field is computed from a
site's private data, so sending it to every site costs nothing. It must never carry noise, seeds,
norms or masks.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from collections.abc import Mapping, Sequence

from mmpfl_core.errors import ConfigError, MMPFLError, PrivacyError
from mmpfl_core.privacy.allocation import check_effective_multiplier, effective_multiplier
from mmpfl_core.privacy.mechanisms import (
    NOT_PRIVATE_WARNING,
    NoisePlacement,
    ReleaseAccounting,
    per_participant_noise_std,
    release_accounting,
    server_top_up_std,
)

__all__ = ["NOISE_MODES", "RELEASE_SCALAR_KEYS", "RoundRelease", "check_noise_mode"]

#: ``secure``: OS CSPRNG (private). ``reproducible-insecure``: derived from the seed, NOT private.
NOISE_MODES = ("secure", "reproducible-insecure")


def check_noise_mode(noise: str, who: str, *, error: type[MMPFLError] = ConfigError, warn: bool = True) -> bool:
    """Validate a ``noise=`` setting (one of :data:`NOISE_MODES`); return True when it is ``"secure"``.

    The one check behind every ``noise=`` of the kit (DP-FedAvg and its subclasses, sample-level
    DP-SGD, :class:`RoundRelease`). ``"reproducible-insecure"`` draws the noise from the seed, so
    anyone with the seed can regenerate and subtract it: with ``warn`` it warns with
    :data:`~mmpfl_core.privacy.mechanisms.NOT_PRIVATE_WARNING` (the words every artefact of such a
    run carries).

    Raises:
        error: ``noise`` is not a known mode (ConfigError for a user setting; RoundRelease passes
            PrivacyError, since there it means a malformed release).
    """
    if noise not in NOISE_MODES:
        raise error(f"{who} noise={noise!r} is unknown; use one of {list(NOISE_MODES)}.")
    if warn and noise != "secure":
        warnings.warn(
            f"{who} with noise={noise!r}: {NOT_PRIVATE_WARNING}. Use noise='secure' for a private run.",
            UserWarning,
            stacklevel=3,
        )
    return noise == "secure"


#: The scalar keys of a serialised release (besides ``clip/<g>``, ``sigma/<g>``, ``drowned/<g>`` per group
#: and ``participants`` under distributed placement).
RELEASE_SCALAR_KEYS = (
    "round",
    "placement",
    "noise",
    "clip_norm",
    "sample_rate",
    "expected_participants",
    "noise_multiplier",
    "count_noise_multiplier",
)
_GROUP_PREFIXES = ("clip/", "sigma/", "drowned/")
_REL_TOL = 1e-9


def _finite_nonneg(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < math.inf:
        raise PrivacyError(f"release {name}={value!r} must be finite and >= 0.")
    return value


@dataclass(frozen=True)
class RoundRelease:
    """The public state of round ``round``'s release (module docstring). Frozen and validated.

    Args:
        round: the round index t >= 1.
        placement: who adds the noise (:class:`~mmpfl_core.privacy.mechanisms.NoisePlacement`).
        clip_norm: C, the bound of a site's whole released update (inf only with no noise: ablations).
        clip_bounds: C_g for every group g (0 for drowned groups).
        sigmas: sigma_g, the std per coordinate of the noise in the released SUM (0 for drowned groups).
        drowned: the groups the noise gate keeps at every site (released by nobody).
        participants: m, the participants the server announced (``distributed`` only, else None).
        expected_participants: qN, the fixed denominator.
        sample_rate: q, the Poisson sampling rate of sites.
        noise_multiplier: z_eff of the update release, checked against (sum_S C_g^2 / sigma_g^2)^(-1/2).
        count_noise_multiplier: z_b of the adaptive-clipping count (0 when adaptive clipping is off).
        noise: "secure" or "reproducible-insecure" (NOT private).
    """

    round: int
    placement: NoisePlacement
    clip_norm: float
    clip_bounds: Mapping[str, float]
    sigmas: Mapping[str, float]
    drowned: frozenset[str]
    expected_participants: float
    sample_rate: float
    noise_multiplier: float
    noise: str = "secure"
    participants: int | None = None
    count_noise_multiplier: float = 0.0
    groups: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once here)
        if isinstance(self.round, bool) or int(self.round) != self.round or self.round < 1:
            raise PrivacyError(f"release round={self.round!r} must be an integer >= 1.")
        set_("round", int(self.round))
        try:
            set_("placement", NoisePlacement(self.placement))
        except ValueError as exc:
            raise PrivacyError(
                f"release placement={self.placement!r} is unknown; use one of {[p.value for p in NoisePlacement]}."
            ) from exc
        check_noise_mode(self.noise, "release", error=PrivacyError, warn=False)
        groups = tuple(sorted(self.clip_bounds))
        if not groups:
            raise PrivacyError("a release needs at least one parameter group.")
        if set(self.sigmas) != set(groups):
            raise PrivacyError(
                f"release groups differ between clip bounds {sorted(groups)} and noise scales "
                f"{sorted(self.sigmas)}; every group needs both C_g and sigma_g."
            )
        drowned = frozenset(self.drowned)
        if not drowned <= set(groups):
            raise PrivacyError(
                f"drowned groups {sorted(drowned - set(groups))} are not groups of the release ({list(groups)})."
            )
        set_("groups", groups)
        set_("drowned", drowned)
        # read-only views: the release is immutable once validated
        set_("clip_bounds", MappingProxyType({g: float(self.clip_bounds[g]) for g in groups}))
        set_("sigmas", MappingProxyType({g: _finite_nonneg(f"sigma/{g}", self.sigmas[g]) for g in groups}))
        if not float(self.clip_norm) > 0:
            raise PrivacyError(f"release clip_norm={self.clip_norm!r} must be > 0.")
        set_("clip_norm", float(self.clip_norm))
        set_("noise_multiplier", _finite_nonneg("noise_multiplier", self.noise_multiplier))
        set_("count_noise_multiplier", _finite_nonneg("count_noise_multiplier", self.count_noise_multiplier))
        if not 0.0 < float(self.sample_rate) <= 1.0:
            raise PrivacyError(f"release sample_rate={self.sample_rate!r} must lie in (0, 1].")
        if not 0.0 < float(self.expected_participants) < math.inf:
            raise PrivacyError(
                f"release expected_participants={self.expected_participants!r} (qN) must be finite and > 0."
            )
        set_("sample_rate", float(self.sample_rate))
        set_("expected_participants", float(self.expected_participants))
        if self.placement is NoisePlacement.DISTRIBUTED:
            m = self.participants
            if m is None or isinstance(m, bool) or int(m) != m or m < 0:
                raise PrivacyError(
                    f"a distributed release needs the announced participant count m (an integer "
                    f">= 0), got participants={m!r}: each participant's share is sigma_g^2 / m."
                )
            set_("participants", int(m))
        elif self.participants is not None:
            raise PrivacyError(
                f"participants={self.participants!r} is only part of a distributed release; "
                f"placement is {self.placement.value!r}."
            )
        self._check_bounds_and_multiplier()

    def _check_bounds_and_multiplier(self) -> None:
        for g in self.drowned:
            if self.clip_bounds[g] != 0.0 or self.sigmas[g] != 0.0:
                raise PrivacyError(
                    f"drowned group {g!r} has C_g={self.clip_bounds[g]!r}, sigma_g={self.sigmas[g]!r}; "
                    "a drowned group is released by nobody: both must be 0."
                )
        released = self.released_groups
        for g in released:
            if not self.clip_bounds[g] > 0:
                raise PrivacyError(
                    f"released group {g!r} has clip bound C_g={self.clip_bounds[g]!r}; it must be > 0 "
                    "(a group with C_g = 0 releases nothing: mark it drowned)."
                )
        if not released:
            return  # nothing is released this round: no multiplier to check, nothing is charged
        if math.isinf(self.clip_norm):
            if self.noise_multiplier != 0 or any(self.sigmas[g] for g in released):
                raise PrivacyError(
                    "clip_norm=inf (no clipping) only goes with no noise (noise_multiplier=0): "
                    "noise on unbounded updates protects nothing."
                )
            return
        total = sum(self.clip_bounds[g] ** 2 for g in released)
        if not math.isclose(total, self.clip_norm**2, rel_tol=_REL_TOL):
            raise PrivacyError(
                f"the released groups' clip bounds give sum C_g^2 = {total!r}, not C^2 = "
                f"{self.clip_norm**2!r}: the whole update would not be bounded by C."
            )
        if self.noise_multiplier == 0:
            if any(self.sigmas[g] for g in released):
                raise PrivacyError("noise_multiplier=0 but some sigma_g > 0: the release is inconsistent.")
            return
        if any(self.sigmas[g] == 0 for g in released):
            zero = [g for g in released if self.sigmas[g] == 0]
            raise PrivacyError(
                f"released groups {zero} have sigma_g = 0 while z = {self.noise_multiplier!r}: they "
                "would be released with no noise (infinite privacy loss)."
            )
        check_effective_multiplier(
            {g: self.clip_bounds[g] for g in released}, self.sigmas, self.noise_multiplier, "release"
        )

    # ------------------------------------------------------------------ public quantities
    @property
    def released_groups(self) -> tuple[str, ...]:
        """S: the groups not drowned (sorted)."""
        return tuple(g for g in self.groups if g not in self.drowned)

    @property
    def releases_anything(self) -> bool:
        """False when the gate drowned every group: the round changes nothing and is not charged."""
        return bool(self.released_groups)

    def effective_multiplier(self) -> float:
        """z_eff = (sum_{g in S} C_g^2 / sigma_g^2)^(-1/2) (docs/DESIGN.md 4.1): inf when S is empty (nothing
        released), 0 when a released group has no noise."""
        return effective_multiplier({g: self.clip_bounds[g] for g in self.released_groups}, self.sigmas)

    def accounting(self) -> ReleaseAccounting:
        """What the ledger is given for this round: the update's z_eff, combined with the adaptive-clipping
        count's z_b when there is one (one Gaussian mechanism on the same sample:
        (z_u^-2 + z_b^-2)^(-1/2)), mapped per placement (local: z/2 at rate 1)."""
        z = self.noise_multiplier
        if self.count_noise_multiplier > 0 and z > 0:
            z = (z**-2 + self.count_noise_multiplier**-2) ** -0.5
        return release_accounting(self.placement, z, self.sample_rate)

    # ------------------------------------------------------------------ site half
    def participant_stds(self) -> dict[str, float]:
        """The std per coordinate THIS participant adds to each group: 0 (server), sigma_g / sqrt(m)
        (distributed, m announced participants), sigma_g (local). Drowned groups: 0 (never sent)."""
        if self.placement is NoisePlacement.DISTRIBUTED and self.participants == 0:
            raise PrivacyError(
                f"round {self.round}: the server announced m = 0 participants, so no site was asked "
                "to contribute; a site that got this release must not send anything."
            )
        m = self.participants if self.placement is NoisePlacement.DISTRIBUTED else 1
        assert m is not None  # validated: distributed releases carry m
        stds = per_participant_noise_std(self.placement, dict(self.sigmas), m).participant_std
        assert isinstance(stds, dict)  # per-group sigmas in, per-group stds out
        return dict(stds)

    def count_participant_std(self) -> float:
        """Distributed adaptive clipping: the std of this participant's share of the count noise, z_b / sqrt(m)."""
        if self.placement is not NoisePlacement.DISTRIBUTED:
            return 0.0
        return self.count_noise_multiplier / math.sqrt(max(1, int(self.participants or 0)))

    def names_to_send(
        self, groups: Mapping[str, Sequence[str]], personal: frozenset[str] | set[str] = frozenset()
    ) -> set[str]:
        """The parameter names a participant sends. Drowned groups: never (nobody releases them).
        ``personal`` (a site's own, private choice of names): left out under ``server`` placement (the
        trusted server treats a missing group as a zero update, within the clip bound); sent as
        noise-only placeholders under ``distributed``/``local``, so the server cannot see the mask."""
        self._check_groups(groups)
        names = {n for g in self.released_groups for n in groups[g]}
        if self.placement is NoisePlacement.SERVER:
            names -= set(personal)
        return names

    # ------------------------------------------------------------------ server half
    def server_fraction(self, arrived: int) -> float:
        """The server's part of the round's noise, as a fraction of every std (sigma_g and z_b), when
        ``arrived`` updates are in the sum: 1 (server), the top-up sqrt((m - s) / m) of missing shares
        (distributed; 1 when m = 0), 0 (local: every site noised its own update)."""
        if self.placement is NoisePlacement.SERVER:
            return 1.0
        if self.placement is NoisePlacement.LOCAL:
            return 0.0
        assert self.participants is not None  # validated: distributed releases carry m
        return server_top_up_std(1.0, self.participants, arrived)

    def server_stds(self, arrived: int) -> dict[str, float]:
        """The std per coordinate the server adds to the SUM of ``arrived`` updates, per group:
        sigma_g times :meth:`server_fraction`."""
        fraction = self.server_fraction(arrived)
        return {g: s * fraction for g, s in self.sigmas.items()}

    def count_server_std(self, arrived: int) -> float:
        """The std the server adds to the adaptive-clipping count: z_b times :meth:`server_fraction`."""
        return self.count_noise_multiplier * self.server_fraction(arrived)

    # ------------------------------------------------------------------ wire format
    def to_record(self) -> dict[str, Any]:
        """A flat dict of int/float/str/bool (a Flower ``ConfigRecord``): the whole public state."""
        out: dict[str, Any] = {
            "round": self.round,
            "placement": self.placement.value,
            "noise": self.noise,
            "clip_norm": self.clip_norm,
            "sample_rate": self.sample_rate,
            "expected_participants": self.expected_participants,
            "noise_multiplier": self.noise_multiplier,
            "count_noise_multiplier": self.count_noise_multiplier,
        }
        if self.placement is NoisePlacement.DISTRIBUTED:
            out["participants"] = self.participants
        for g in self.groups:
            out[f"clip/{g}"] = self.clip_bounds[g]
            out[f"sigma/{g}"] = self.sigmas[g]
            out[f"drowned/{g}"] = g in self.drowned
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, groups: Sequence[str] | None = None) -> RoundRelease:
        """Read :meth:`to_record`'s dict back, refusing a missing or unknown key, or (``groups`` given: the
        site's own groups) a different set of groups. Each refusal means the server and the site run
        different configurations; the site must not guess."""
        record = dict(record)
        per_group = {p: {k[len(p) :] for k in record if k.startswith(p)} for p in _GROUP_PREFIXES}
        named = per_group["sigma/"] | per_group["clip/"] | per_group["drowned/"]
        expected_groups = set(groups) if groups is not None else named
        placement = record.get("placement")
        expected = set(RELEASE_SCALAR_KEYS) | {f"{p}{g}" for p in _GROUP_PREFIXES for g in expected_groups}
        if placement == NoisePlacement.DISTRIBUTED.value:
            expected.add("participants")
        missing, unknown = sorted(expected - set(record)), sorted(set(record) - expected)
        if missing or unknown:
            raise PrivacyError(
                f"the round's release record {'lacks ' + str(missing) if missing else ''}"
                f"{' and ' if missing and unknown else ''}"
                f"{'has unknown key(s) ' + str(unknown) if unknown else ''}: the server and this site "
                "run different strategy configurations (groups, placement or version); start both "
                "from the same preset and method arguments."
            )
        for g in expected_groups:
            if not isinstance(record[f"drowned/{g}"], bool):
                raise PrivacyError(f"drowned/{g}={record[f'drowned/{g}']!r} must be a bool.")
        for key in ("round",) + (("participants",) if "participants" in record else ()):
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise PrivacyError(f"release {key}={value!r} must be an integer.")
        return cls(
            round=record["round"],
            placement=placement,  # type: ignore[arg-type]  # __post_init__ converts
            noise=str(record["noise"]),
            clip_norm=float(record["clip_norm"]),
            sample_rate=float(record["sample_rate"]),
            expected_participants=float(record["expected_participants"]),
            noise_multiplier=float(record["noise_multiplier"]),
            count_noise_multiplier=float(record["count_noise_multiplier"]),
            participants=record.get("participants"),
            clip_bounds={g: float(record[f"clip/{g}"]) for g in expected_groups},
            sigmas={g: float(record[f"sigma/{g}"]) for g in expected_groups},
            drowned=frozenset(g for g in expected_groups if record[f"drowned/{g}"]),
        )

    def _check_groups(self, groups: Mapping[str, Sequence[str]]) -> None:
        if set(groups) != set(self.groups):
            raise PrivacyError(f"the model's groups {sorted(groups)} differ from the release's {list(self.groups)}.")
