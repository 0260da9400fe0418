"""Client-level differentially private FedAvg ("dp-fedavg"); the Fisher-allocated variant is in :mod:`.dp_fisher`.

Algorithm of one round t (McMahan et al. 2018, "Learning differentially private recurrent language
models"; DESIGN 4.1-4.3), unit of privacy = one site (add/remove-one-site adjacency):
    1. Sites are Poisson-sampled with rate q (``FederatedConfig.sampling="poisson"``, or q = 1):
       :meth:`configure` refuses fixed-size sampling with q < 1, because the accountant assumes
       Poisson sampling with q = ``client_fraction``.
    2. A sampled site validates its update (NaN/Inf/shape: rejected, logged, replaced by a zero
       update, which is within the clip bound, never averaged) and clips it per group g to norm
       C_g (``clipping="flat"``: one group, C_g = C; ``"per-group"``: C_g = C sqrt(d_g / d), so
       sum_g C_g^2 = C^2).
    3. Gaussian noise N(0, sigma_g^2) per coordinate is added to the sum (``placement="server"``),
       split over the m participants the server announced for the round (``"distributed"``:
       sigma_g^2 / m each, secure aggregation assumed; the server tops up the shares of announced
       participants whose update did not arrive) or by every site to its own update (``"local"``).
       Adjacency and trust model of each placement: :class:`~mmpfl_core.privacy.NoisePlacement`.
    4. theta <- theta + (sum_k clip(Delta_k) + noise) / (q N): the FIXED denominator q N, so the
       sensitivity of the released average does not depend on who took part.
    5. The round is recorded in the :class:`PrivacyLedger` as one subsampled Gaussian release with
       multiplier z_eff = (sum_g C_g^2 / sigma_g^2)^(-1/2) and rate q (``release_accounting``:
       local placement is z/2 at rate 1, charged every round for every site: an upper bound).

Empty rounds: Poisson sampling may select nobody. The round still releases theta + noise / (qN);
the subsampled-Gaussian analysis covers that outcome (it is one of the mechanism's outputs), and
skipping the noise would reveal that nobody took part. So empty rounds add noise and are charged,
in every placement (distributed: the server draws all of sigma_g^2 when m = 0). No placement has a
participant-count threshold or abort, in-process or in the Flower app: an abort that depends on
the sample would change the release with one site's participation (its probability would belong in
delta); with shares sigma_g^2 / m the release never needs one. (The Flower app runs SecAgg+ only
when m >= 2; with m = 1 the single noised update IS the sum the server would see.)

Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive clipping"):
each participant also sends b_k = 1[||Delta_k|| <= C]; the server releases the noisy fraction
b = (sum_k b_k + N(0, z_b^2)) / (qN) and sets C <- C exp(-eta (clip(b, 0, 1) - gamma)), kept within
[C_0 / 100, 100 C_0] (post-processing: clipping the noisy fraction costs nothing and bounds the step
to a factor exp(eta max(gamma, 1 - gamma)) per round, which matters with few sites, where the count
noise z_b / (qN) is far larger than the fraction itself).
The count and the update use the SAME Poisson sample, so they are one Gaussian mechanism with
multiplier (z_u^-2 + z_b^-2)^(-1/2) (``PrivacyLedger.record_joint``); z_u is chosen so that this
equals the calibrated z.

Randomness (``noise=``): ``"secure"`` (the default) draws every noise vector, every adaptive-clipping
count noise and the Poisson sample of sites from the OS CSPRNG (:mod:`mmpfl_core.privacy.randomness`):
nothing about them derives from the run seed, nothing is stored, and a resumed run continues with
the same ledger (same epsilon), not the same bits. ``"reproducible-insecure"`` derives them from
(run seed, round, party): bit-identical runs and resumes for teaching and tests, and NOT private,
because anyone holding the seed regenerates the noise and subtracts it
(:func:`mmpfl_core.attacks.noise_subtraction.subtract_regenerated_noise`); it warns, and the
summary says so (``privacy.noise`` / ``privacy.not_private``).
Epsilon is only ever read from the ledger's accountant. What is never released: pre-clipping
norms, raw clip indicators, noise, seeds of secret draws.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any
from collections.abc import Sequence

import torch
from torch import nn

from ..data.federation import Federation
from ..errors import ConfigError, PrivacyError
from ..privacy import (NOT_PRIVATE_WARNING, NoisePlacement, NoiseSource, PrivacyLedger, UpdateRejected, calibrate_noise,
                       clip_per_group, gaussian_noise_like, per_participant_noise_std,
                       release_accounting, server_top_up_std, uniform_noise_allocation, validate_update)
from ..privacy.dp_sgd import SampleLevelDP
from ..seeding import torch_generator
from .client import ClientUpdate
from .config import FederatedConfig
from .sample_level import SampleLevelHooks
from .server_optimizer import make_server_optimizer, split_server_optimizer_tensors
from .strategies import State, StopTraining, register_strategy

__all__ = ["CLIP_INDICATOR", "DPFedAvg", "NOISE_MODES", "check_noise_mode"]

logger = logging.getLogger(__name__)
_NOISE_STREAM = 41
#: Adaptive clipping keeps C within [C_0 / R, C_0 R] (a public constant; post-processing).
_ADAPTIVE_RANGE = 100.0
#: Reserved key of the transmitted dict that carries the (noised) adaptive-clipping indicator.
CLIP_INDICATOR = "_dp.clip_indicator"


#: ``secure``: OS CSPRNG, private (default). ``reproducible-insecure``: from the seed, NOT private.
NOISE_MODES = ("secure", "reproducible-insecure")


def check_noise_mode(noise: str, who: str) -> bool:
    """Validate a ``noise=`` setting; warn for the reproducible mode. Returns True when secure."""
    if noise == "seeded":
        raise ConfigError(f"{who} noise='seeded' was renamed noise='reproducible-insecure' (it is not private: the "
                          "noise can be regenerated from the seed); private runs use the default noise='secure'.")
    if noise not in NOISE_MODES:
        raise ConfigError(f"{who} noise={noise!r} is unknown; use one of {list(NOISE_MODES)}.")
    if noise != "secure":
        warnings.warn(f"{who} with noise={noise!r}: {NOT_PRIVATE_WARNING}. Use noise='secure' for a private run.",
                      UserWarning, stacklevel=3)
    return noise == "secure"


#: (adjacency, trust model) of each placement, written to the summary (NoisePlacement has the argument).
_TRUST = {
    NoisePlacement.SERVER: ("add/remove one site", "honest-but-curious server sees clipped updates and adds the noise; "
                            "the guarantee covers what the server releases"),
    NoisePlacement.DISTRIBUTED: ("add/remove one site", "each of the m announced participants adds sigma^2/m, the server "
                                 "sees only the sum (secure aggregation assumed) and tops up missing shares; the "
                                 "server knows who took part, so against it there is no amplification by sampling"),
    NoisePlacement.LOCAL: ("replace one site", "no trust in the server: every update is private on its own, no "
                           "amplification by sampling"),
}


def _choice(field: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"dp-fedavg {field}={value!r} is unknown; use one of {list(allowed)}.")


@register_strategy("dp-fedavg")
class DPFedAvg(SampleLevelHooks):
    """Client-level DP-FedAvg (module docstring). All arguments keyword-only.

    Args:
        target_epsilon: budget over ``calibration_rounds`` (default: all rounds); z is calibrated
            with ``calibrate_noise``. Exactly one of ``target_epsilon`` / ``noise_multiplier``.
        noise_multiplier: z directly (0 disables noise: epsilon = inf, for ablations only).
        delta: default 1e-5; must be well below 1 / (number of sites).
        clip_norm: C, the bound of a site's whole update (inf only with noise_multiplier=0).
        clipping: "flat" or "per-group" (C_g = C sqrt(d_g/d) over the model's parameter groups).
        placement: "server", "distributed" or "local" (DESIGN 4.2).
        accountant: "prv" (default), "rdp" or "pld".
        adaptive_clipping, target_quantile, clip_lr, count_noise_multiplier: Andrew et al. 2021
            (default z_b = 10 z: the count takes 1 % of the round's budget in zCDP terms).
        min_participants: removed (shares are sigma_g^2 / m for the announced count m; passing it is an error).
        noise: "secure" (default: OS CSPRNG, private) or "reproducible-insecure" (from the seed; teaching
            and tests only, NOT private). budget_stop: stop before a round that would exceed the budget.
        sample_level_dp: optional kwargs of :class:`SampleLevelDP` to add DP-SGD inside each site.
        server_optimizer: optional kwargs of :class:`~.server_optimizer.ServerOptimizerConfig`
            (FedAvgM / FedAdam on the released average: post-processing, no privacy cost).
    """

    uses_noise_allocation = "uniform"

    def __init__(self, *, target_epsilon: float | None = None, noise_multiplier: float | None = None,
                 delta: float = 1e-5, clip_norm: float = 1.0, clipping: str = "flat", placement: str = "server",
                 accountant: str = "prv", adaptive_clipping: bool = False, target_quantile: float = 0.5,
                 clip_lr: float = 0.2, count_noise_multiplier: float | None = None, min_participants: int | None = None,
                 noise: str = "secure", budget_stop: bool = True, calibration_rounds: int | None = None,
                 sample_level_dp: dict[str, Any] | None = None,
                 server_optimizer: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.secret_randomness = check_noise_mode(noise, "dp-fedavg")
        self.server_optimizer = make_server_optimizer(server_optimizer)
        self.sample_dp = None if sample_level_dp is None else SampleLevelDP(**{"noise": noise, **sample_level_dp})
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ConfigError("dp-fedavg needs exactly one of target_epsilon (e.g. 8.0) or noise_multiplier.")
        if target_epsilon is not None and not 0 < target_epsilon < math.inf:
            raise ConfigError(f"dp-fedavg target_epsilon={target_epsilon!r} must be finite and > 0, e.g. 8.0.")
        if noise_multiplier is not None and not 0 <= noise_multiplier < math.inf:
            raise ConfigError(f"dp-fedavg noise_multiplier={noise_multiplier!r} must be finite and >= 0.")
        if not 0 < delta < 1:
            raise ConfigError(f"dp-fedavg delta={delta!r} must lie in (0, 1); use e.g. 1e-5 (<< 1/number of sites).")
        if not clip_norm > 0 or (math.isinf(clip_norm) and noise_multiplier != 0):
            raise ConfigError(f"dp-fedavg clip_norm={clip_norm!r} must be > 0 and finite (inf only with "
                              "noise_multiplier=0, which is not private).")
        _choice("clipping", clipping, ("flat", "per-group"))
        _choice("placement", placement, [p.value for p in NoisePlacement])
        _choice("accountant", accountant, ("prv", "rdp", "pld"))
        if not 0 < target_quantile < 1 or not clip_lr > 0:
            raise ConfigError(f"dp-fedavg target_quantile={target_quantile!r} must lie in (0, 1) and "
                              f"clip_lr={clip_lr!r} must be > 0.")
        if adaptive_clipping and placement == "local":
            raise ConfigError("dp-fedavg adaptive_clipping=True needs placement 'server' or 'distributed'.")
        if min_participants is not None:
            raise ConfigError(f"dp-fedavg min_participants={min_participants!r} is no longer a setting: with "
                              "placement='distributed' each site adds sigma^2/m for the m participants the server "
                              "announces, so the aggregate's noise never depends on who took part; drop the key.")
        if calibration_rounds is not None and calibration_rounds < 1:
            raise ConfigError(f"dp-fedavg calibration_rounds={calibration_rounds!r} must be >= 1.")
        self.target_epsilon, self.delta, self.clip_norm = target_epsilon, float(delta), float(clip_norm)
        self._initial_clip = float(clip_norm)
        self.clipping, self.placement, self.accountant = clipping, NoisePlacement(placement), accountant
        self.adaptive, self.target_quantile, self.clip_lr = bool(adaptive_clipping), target_quantile, clip_lr
        self.noise, self.budget_stop = noise, bool(budget_stop)
        self._z_given, self._z_count_given = noise_multiplier, count_noise_multiplier
        self.calibration_rounds = calibration_rounds
        self.ledger = PrivacyLedger(delta=self.delta, accountant=accountant, target_epsilon=target_epsilon)
        self._round, self._dropped, self._dropped_total = 0, 0, 0
        self._announced: int | None = None  # m: participants announced for this round (distributed shares)
        self._configured, self._sigmas = False, None

    # ------------------------------------------------------------------ set-up
    def configure(self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int],
                  model: nn.Module) -> None:
        """Validate the sampling, calibrate z, and fix the groups and clip bounds (public quantities)."""
        q = float(config.client_fraction)
        if q < 1.0 and config.sampling != "poisson":
            raise ConfigError(f"{self.name} with client_fraction={q} needs federated.sampling='poisson' (the "
                              f"accountant assumes Poisson sampling), got {config.sampling!r}; set sampling: poisson.")
        self._configure_sample_level(config)
        self.sample_rate, self.num_clients, self.seed = q, len(client_ids), int(config.seed)
        self.expected_participants = q * len(client_ids)  # the fixed denominator qN
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        if self.clipping == "per-group":
            if not hasattr(model, "parameter_groups"):
                raise ConfigError("clipping='per-group' needs a model with parameter_groups(); use clipping='flat'.")
            keep = set(names)
            self.groups = {g: [n for n in ns if n in keep] for g, ns in model.parameter_groups().items()}
            self.groups = {g: ns for g, ns in self.groups.items() if ns}
        else:
            self.groups = {"all": names}
        self.group_sizes = {g: sum(math.prod(self.shapes[n]) for n in ns) for g, ns in self.groups.items()}
        rounds = self.calibration_rounds or config.num_rounds
        local = self.placement is NoisePlacement.LOCAL
        if self._z_given is not None:
            z = float(self._z_given)
        else:  # local: accountant sees z/2 at rate 1 (replace-one sensitivity 2C, no amplification)
            z = calibrate_noise(target_epsilon=self.target_epsilon, target_delta=self.delta,
                                sample_rate=1.0 if local else q, steps=rounds, accountant=self.accountant)
            z = 2.0 * z if local else z
        self.noise_multiplier = z
        self.count_noise_multiplier = (self._z_count_given if self._z_count_given is not None else 10.0 * z)
        if self.adaptive and not self.count_noise_multiplier > z:
            raise ConfigError(f"count_noise_multiplier={self.count_noise_multiplier} must exceed the round's "
                              f"noise multiplier {z:.4g} (the count shares the round's budget).")
        # z_u with combine(z_u, z_b) = z: the update gets what the count leaves of the budget.
        self.update_noise_multiplier = (z if not self.adaptive or z == 0 else
                                        (z ** -2 - self.count_noise_multiplier ** -2) ** -0.5)
        self.release = release_accounting(self.placement, z, q)
        self._configured = True
        self._set_bounds(self.clip_norm)

    def _set_bounds(self, clip_norm: float) -> None:
        self.clip_norm = clip_norm
        total = sum(self.group_sizes.values())
        self.clip_bounds = {g: clip_norm * math.sqrt(d / total) for g, d in self.group_sizes.items()}

    def noise_allocation(self, round_index: int, global_state: State) -> dict[str, float]:
        """sigma_g per group for this round; uniform sigma_g = z_u C (Fisher subclass overrides)."""
        if self.update_noise_multiplier == 0:
            return {g: 0.0 for g in self.groups}
        return dict(uniform_noise_allocation(group_sizes=self.group_sizes, clip_bounds=self.clip_bounds,
                                             noise_multiplier=self.update_noise_multiplier).sigmas)

    def _source(self, round_index: int, party: int) -> NoiseSource:
        """Noise of round t for party (0 = server, k + 1 = site k): the OS CSPRNG (secure), or a stream
        derived from (seed, round, party) (reproducible-insecure: resume is bit-exact, nothing is private)."""
        if self.secret_randomness:
            return NoiseSource.secure()
        return NoiseSource(generator=torch_generator(self.seed, _NOISE_STREAM, round_index, party))

    # ------------------------------------------------------------------ round hooks
    def select(self, client_ids: Sequence[int], config: FederatedConfig, rng: Any) -> list[int]:
        """Poisson-sample the sites and announce their number m (the distributed noise shares)."""
        selected = super().select(client_ids, config, rng)
        self.announce_participants(len(selected))
        return selected

    def announce_participants(self, count: int) -> None:
        """Server side: the number m of participants asked to contribute this round. Under
        ``distributed`` placement each adds N(0, sigma_g^2 / m) (the count is told to the
        participants in :meth:`round_instructions`, never released). The Flower app announces the
        selected sites that are connected."""
        if int(count) != count or count < 0:
            raise PrivacyError(f"announced participant count {count!r} must be an integer >= 0.")
        self._announced = int(count)

    def before_round(self, round_index: int) -> None:
        if not self._configured:
            raise PrivacyError(f"{self.name} was not configured; run it through FederatedSimulation.")
        self._round, self._dropped, self._sigmas, self._announced = round_index, 0, None, None
        if self.budget_stop and self.ledger.would_exceed(*self.release):
            raise StopTraining(f"round {round_index} would take epsilon above the budget "
                               f"{self.target_epsilon} (now {self.ledger.epsilon():.4g}, delta={self.delta:g})")

    def round_instructions(self, round_index: int, global_state: State) -> dict[str, float]:
        """Server side: this round's clip norm C and per-group noise scales sigma_g (public: they come
        from the calibration, the public set and released models, never from a site's data)."""
        sigmas = self._round_sigmas(global_state)
        out = {"clip_norm": float(self.clip_norm), **{f"sigma/{g}": float(sigmas[g]) for g in self.groups}}
        if self.placement is NoisePlacement.DISTRIBUTED:
            if self._announced is None:
                raise PrivacyError(f"round {round_index}: announce the participant count (select() or "
                                   "announce_participants()) before the instructions of a distributed round.")
            out["participants"] = float(self._announced)
        return out

    def apply_round_instructions(self, round_index: int, instructions: dict[str, float]) -> None:
        """Site side (Flower): use the server's C and sigma_g, so the site clips and noises exactly as the
        in-process loop would (and never recomputes them from its own data)."""
        if not self._configured:
            raise PrivacyError(f"{self.name} was not configured on the site; call configure() first.")
        missing = [k for k in ["clip_norm", *(f"sigma/{g}" for g in self.groups)] if k not in instructions]
        if missing:
            raise PrivacyError(f"round {round_index}: the server's instructions lack {missing}; the site cannot "
                               "clip and noise its update (server and site run different strategy configs?).")
        self._round, self._dropped = round_index, 0
        self._set_bounds(float(instructions["clip_norm"]))
        self._sigmas = {g: float(instructions[f"sigma/{g}"]) for g in self.groups}
        if self.placement is NoisePlacement.DISTRIBUTED:
            if "participants" not in instructions:
                raise PrivacyError(f"round {round_index}: a distributed round needs the announced participant count "
                                   "('participants') to size this site's noise share sigma^2/m.")
            self.announce_participants(int(instructions["participants"]))

    def _round_sigmas(self, global_state: State) -> dict[str, float]:
        if self._sigmas is None:  # once per round, from public quantities only
            self._sigmas = self.noise_allocation(self._round, global_state)
        return self._sigmas

    def client_start_state(self, site_id: int, global_state: State) -> State:
        self._round_sigmas(global_state)
        return global_state

    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        """Site side: validate, clip per group, add this site's share of the noise."""
        self._record_sample_level(update, round_index)
        delta = {n: update.delta[n] for n in self.shapes if n in update.delta}
        rejected = False
        try:
            validate_update(delta, self.shapes)
        except UpdateRejected as exc:
            logger.warning("round %d: site %d update rejected and replaced by zeros: %s", round_index,
                           update.site_id, exc)
            self._dropped, self._dropped_total, rejected = self._dropped + 1, self._dropped_total + 1, True
            delta = {n: torch.zeros(s) for n, s in self.shapes.items()}
        clipped, norms = clip_per_group(delta, self.groups, self.clip_bounds)
        if self.placement is not NoisePlacement.SERVER:
            stds = self.participant_noise_stds()
            noise = gaussian_noise_like(clipped, stds, self.groups, self._source(round_index, update.site_id + 1))
            clipped = {n: clipped[n] + noise[n] for n in clipped}
        if self.adaptive:  # b_k = 1[||Delta_k|| <= C]; never released raw except to a trusted server
            bit = 0.0 if rejected else float(math.sqrt(sum(v * v for v in norms.values())) <= self.clip_norm)
            indicator = torch.tensor([bit], dtype=torch.float64)
            if self.placement is NoisePlacement.DISTRIBUTED:
                source = self._source(round_index, update.site_id + 1)
                share = self.count_noise_multiplier / math.sqrt(self._participants_for_shares())
                indicator = indicator + share * source.standard_normal((1,), dtype=torch.float64)
            clipped[CLIP_INDICATOR] = indicator
        return clipped

    def _participants_for_shares(self) -> int:
        if self._announced is None:
            raise PrivacyError("a distributed-placement site needs the announced participant count m before it can "
                               "draw its noise share sigma^2/m (select() / announce_participants() / instructions).")
        return max(1, self._announced)

    def participant_noise_stds(self) -> dict[str, float]:
        """Site side: the std per group this site adds (distributed: sigma_g / sqrt(m); local: sigma_g).

        The one place the share is sized: a deliberately broken variant (sigma_g / sqrt(m_min), whose
        aggregate variance grows with the participant count) is a subclass overriding this method.
        """
        m = self._participants_for_shares() if self.placement is NoisePlacement.DISTRIBUTED else 1
        return per_participant_noise_std(self.placement, self._sigmas, m).participant_std

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State],
                  round_index: int) -> State:
        """Server side: re-validate, sum, then :meth:`release_sum` (noise, qN, ledger)."""
        valid = []
        for update, s in zip(updates, sent):
            params = {n: t for n, t in s.items() if n != CLIP_INDICATOR}
            try:
                validate_update(params, self.shapes)
                valid.append(s)
            except UpdateRejected as exc:
                logger.warning("round %d: dropped the transmitted update of site %d: %s", round_index,
                               update.site_id, exc)
                self._dropped, self._dropped_total = self._dropped + 1, self._dropped_total + 1
        total: State = {}
        for name, value in global_state.items():  # summed in arrival order, as FedAvg does
            total[name] = sum(s[name] for s in valid) if valid else torch.zeros_like(value)
        if self.adaptive:
            total[CLIP_INDICATOR] = sum((s[CLIP_INDICATOR].sum() for s in valid), torch.zeros((), dtype=torch.float64))
        return self.release_sum(global_state, total, len(valid), round_index)

    def release_sum(self, global_state: State, total: State, num_participants: int, round_index: int) -> State:
        """Server side, from the SUM of the participants' clipped (and, placement permitting, noised)
        updates: add server noise, divide by qN, adapt C, record the release in the ledger.

        :meth:`aggregate` calls it after validating each update; an engine with secure aggregation
        (Flower + SecAgg+) calls it directly with the unmasked sum, which is all such a server ever
        sees. ``num_participants`` is the number s of updates in the sum. Under ``distributed``
        placement the m announced participants each added sigma_g^2 / m, so when s < m (dropouts, a
        failed secure sum, m = 0) the server adds the missing N(0, sigma_g^2 (m - s) / m): the
        released sum always carries exactly sigma_g^2, and nothing is ever aborted.
        """
        sigmas = self._round_sigmas(global_state)
        new_state = {n: total[n] for n in global_state}
        server_std, source = self._server_noise_fraction(num_participants), self._source(round_index, 0)
        if server_std > 0 and any(v > 0 for v in sigmas.values()):
            noise = gaussian_noise_like(new_state, {g: v * server_std for g, v in sigmas.items()}, self.groups, source)
            new_state = {n: t + noise[n] for n, t in new_state.items()}
        new_state = {n: global_state[n] + (t / self.expected_participants).to(global_state[n].dtype)
                     for n, t in new_state.items()}
        if self.server_optimizer is not None:  # post-processing of the release above
            new_state = self.server_optimizer.step(global_state, new_state)
        if self.adaptive:
            count = float(total[CLIP_INDICATOR].sum()) if CLIP_INDICATOR in total else 0.0
            if server_std > 0:
                count += server_std * self.count_noise_multiplier * float(source.standard_normal((1,), dtype=torch.float64))
            # Post-processing of the noisy count, so free: clip the fraction to [0, 1] and C to
            # [C0 / R, C0 R]. With few sites the count noise z_b / (qN) dwarfs the count (3 sites,
            # z_b = 60: std 20), and the unclipped rule drove C from 1 to 6e-12 to 9e4 (issue 14).
            fraction = min(1.0, max(0.0, count / self.expected_participants))
            step = math.exp(-self.clip_lr * (fraction - self.target_quantile))
            self._set_bounds(min(self._initial_clip * _ADAPTIVE_RANGE,
                                 max(self._initial_clip / _ADAPTIVE_RANGE, self.clip_norm * step)))
            self.ledger.record_joint(name="update+clip_count", round=round_index, sample_rate=self.release.sample_rate,
                                     noise_multipliers=[self.update_noise_multiplier, self.count_noise_multiplier])
        else:
            self.ledger.record(name="update", noise_multiplier=self.release.noise_multiplier,
                               sample_rate=self.release.sample_rate, round=round_index)
        return new_state

    def _server_noise_fraction(self, arrived: int) -> float:
        """The server's noise std as a fraction of sigma_g: 1 (server placement), the top-up
        sqrt((m - s) / m) of missing distributed shares, 0 (local placement)."""
        if self.placement is NoisePlacement.SERVER:
            return 1.0
        if self.placement is NoisePlacement.LOCAL:
            return 0.0
        announced = arrived if self._announced is None else self._announced
        return server_top_up_std(1.0, announced, arrived)

    # ------------------------------------------------------------------ reports and state
    def round_report(self, round_index: int) -> dict[str, float]:
        return {"epsilon": self.ledger.epsilon(), "clip_norm": self.clip_norm, "dp_dropped": self._dropped,
                **self._sample_report()}

    def summary_report(self) -> dict[str, Any]:
        out = {**self.ledger.summary(), "noise_multiplier": self.noise_multiplier,
               "update_noise_multiplier": self.update_noise_multiplier, "placement": self.placement.value,
               "clipping": self.clipping, "sample_rate": self.sample_rate, "noise_allocation": self.uses_noise_allocation,
               "expected_participants": self.expected_participants, "dropped_updates": self._dropped_total,
               "final_clip_norm": self.clip_norm, "noise": self.noise}
        if not self.secret_randomness:
            out["not_private"] = NOT_PRIVATE_WARNING
        out["adjacency"], out["trust_model"] = _TRUST[self.placement]
        return {"privacy": out, **self._sample_summary()}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, _ = super().state_dict()
        if self.server_optimizer is not None:
            tensors = {**tensors, **self.server_optimizer.state_dict()}
        return tensors, {"ledger": self.ledger.state_dict(), "clip_norm": self.clip_norm,
                         "dropped_total": self._dropped_total,
                         "sample_dp": None if self.sample_dp is None else self.sample_dp.state_dict()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        server_tensors, tensors = split_server_optimizer_tensors(tensors)
        if self.server_optimizer is not None:
            self.server_optimizer.load_state_dict(server_tensors)
        super().load_state_dict(tensors, state)
        self.ledger.load_state_dict(state["ledger"])
        self._set_bounds(float(state["clip_norm"]))
        self._dropped_total = int(state["dropped_total"])
        if self.sample_dp is not None:
            self.sample_dp.load_state_dict(state["sample_dp"])
