"""Cross-silo DP-SGD: one DP-SGD step over the UNION of the hospitals' patients per round, the per-patient
clipped gradient sums released only through secure aggregation, with ONE Gaussian noise on the aggregate
(strategy ``cross-silo-dp-sgd``; docs/DESIGN.md 4.2 ``distributed`` placement, 4.5, 4.7).

Why: DP-SGD inside each site (``dp-sgd-fedavg``, ``local-dp-sgd``, ``mr-mtl``) adds noise z C per site step of
B ~ 8-16 patients, and averaging K sites divides it only by sqrt(K): per-step noise-to-signal
z sqrt(d) / (B sqrt(K)). Here the noise is added once to the sum over all sites, so it is z sqrt(d) / (q N),
N the patients of all sites: a factor sqrt(K) smaller at the same (q, z).

Algorithm of round t (FedSGD; Abadi et al. 2016 over the union, with distributed noise as in
Kairouz et al. 2021 "The distributed discrete Gaussian mechanism", here continuous and in-process):
    0. (Server, public.) All m sites take part (cross-silo: ``client_fraction`` must be 1); the
       round announces m.
    1. Site k Poisson-samples its training patients, each independently with the SAME rate q.
    2. Per-patient gradients g_i of the trainable parameters (Opacus ``GradSampleModule``, hooks mode,
       as :mod:`mmpfl_core.privacy.dp_sgd`), each clipped JOINTLY (shared and personal coordinates
       together, one flat norm) to C: gbar_i = g_i min(1, C / ||g_i||).
    3. Shared coordinates: the site sends S_k = sum_i gbar_i[shared] + N(0, z^2 C^2 / m I) through
       secure aggregation (assumed, not simulated, as docs/DESIGN.md 4.2 says for ``distributed``).
    4. Server: sum_k S_k, plus a top-up N(0, z^2 C^2 (m - s) / m I) if only s < m shares arrived, so
       the aggregate carries N(0, z^2 C^2 I) whatever m and s; divide by the fixed expected batch q N
       (site sizes are public, the size caveat of :mod:`mmpfl_core.privacy.dp_sgd`) and step the SERVER
       optimiser (:mod:`~.server_optimizer`, Adam by default, at the run's learning rate) with that
       averaged noisy gradient: the new shared parameters.
    5. Personal coordinates (``personal_groups``, e.g. ``("head",)``) never leave the site: it adds the
       FULL N(0, z^2 C^2 I) to sum_i gbar_i[personal], divides by q n_k and steps its own copy with the
       run's local optimiser (``FederatedConfig.optimizer``).

Privacy argument. Unit: one patient, across hospitals (add/remove one patient of any site). Patient i of
site k enters only (a) the shared aggregate and (b) site k's personal sum. The joint vector
(aggregate, personal sum of k) has sensitivity C (joint clipping of gbar_i) and Gaussian noise of std
z C on EVERY coordinate (the aggregate's m shares sum to variance z^2 C^2; the personal sum carries the
full z^2 C^2 itself), and the other sites' personal sums do not depend on i. So every round is ONE
Poisson-subsampled Gaussian mechanism at (q, z) for every patient, and the run is T = ``num_rounds`` such
steps: one ledger for all patients (:class:`~mmpfl_core.privacy.ledger.PrivacyLedger`, Opacus's RDP or
PRV accountant), epsilon from the accountant; with ``target_epsilon`` z is calibrated so that
epsilon(q, z, T) <= target at delta <= 1 / (10 N). The shared model and every site's deployed model
(shared merged with its personal copy) are post-processing of these steps.

Trust: against the server (and anyone who sees only the released aggregate) the guarantee above holds
because secure aggregation shows it the sum alone. Against a coalition of sites, who can subtract their
own shares, the honest sites' shares remain: with h honest sites the aggregate still carries
N(0, z^2 C^2 h / m) and the guarantee degrades to multiplier z sqrt(h / m) (not accounted here). Without
secure aggregation a single share (std z C / sqrt(m)) protects nothing worth the name.

Randomness: ``noise="secure"`` (default) draws the Poisson samples and every noise share from the OS
CSPRNG (:mod:`mmpfl_core.privacy.randomness`); ``"reproducible-insecure"`` draws them from the run's
seeded streams (teaching and tests only; warns, and the summary says "not private").

Scope: the personal groups are the same at every site and fixed for the run. MM-PFL-ADP on this mechanism
(per-group clipping, the Fisher allocation, per-site KL masks with noise-only placeholder shares, the noise gate
sized for q N patients per noise draw) is the subclass :mod:`.mm_pfl_adp_cross_silo`.

Measured (``bench/results/wcp_secagg_probe.md``: headline cohort, alpha 10, lesion contrast 0.3, ``head+bias``
d = 2,915, seed 0, patient epsilon 8, 200 rounds of q N = 128, server Adam 5e-3; 201 test subjects):
personal accuracy 0.701 [0.637, 0.761] everything shared, 0.706 [0.637, 0.766] with the head personal, against
public-model-only 0.642 [0.572, 0.706], local + DP-SGD 0.652 and FedAvg + DP-SGD 0.657 [0.587, 0.721].

Simulation speed (``batched_sites``, default on): in this in-process simulation the round's first site computes
EVERY site's clipped sum at once (:meth:`CrossSiloDPSGD.batched_clipped_sums`: one Opacus pass over the union
batch where every site starts from the same parameters, ``vmap`` with per-patient parameters where personal copies
or masks differ), and each site's turn takes its own entry after checking its Poisson sample, inputs and start
parameters (else it computes its sum itself). Clipping stays per patient and sums per site, so every share, noise
draw and ledger entry is the per-site path's; the sums agree to float32 rounding (``tests/test_cross_silo_batched.py``:
the same released global models round by round, the same epsilon). A deployment computes each sum at its site.
Measured (``bench/cross_silo_batched.py``, headline size, shared 2-core machine): a round 2.0-2.4 times faster.

Must never release: per-patient gradients or norms, a site's un-noised or single share, the Poisson
sample, the personal coordinates, or the noise and its seed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data.contract import CohortDataset
from ..data.federation import Federation
from ..errors import ConfigError
from ..privacy.accounting import calibrate_noise
from ..privacy.dp_sgd import poisson_batch
from ..privacy.ledger import PrivacyLedger
from ..privacy.mechanisms import NOT_PRIVATE_WARNING
from ..privacy.randomness import secure_gaussian
from ..privacy.release import check_noise_mode
from .client import ClientUpdate, build_optimizer, forward_batch
from .config import FederatedConfig
from .server_optimizer import ServerOptimizer, ServerOptimizerConfig, split_server_optimizer_tensors
from .strategies import State, Strategy, register_strategy

__all__ = ["PRIVACY_UNIT", "CrossSiloDPSGD", "clipped_per_patient_sum", "per_patient_group_clipped_sum"]

#: What the summary names as the protected unit.
PRIVACY_UNIT = "patient (across hospitals, secure aggregation)"
_PERSONAL_OPT_PREFIX = "personal_optimizer:"


def _per_patient_gradients(
    model: nn.Module, batch: dict[str, torch.Tensor], *, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, nn.Parameter], torch.Tensor]:
    """Per-patient gradients (B, d_n) of the cross-entropy by trainable name, the parameters, and the per-patient
    losses (B,).

    Opacus' ``GradSampleModule`` (hooks mode, the grad-sample mode :mod:`mmpfl_core.privacy.dp_sgd` uses and
    measured fastest on two cores). Nothing returned here may leave the site un-clipped and un-noised.
    """
    from opacus import GradSampleModule

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        losses = nn.functional.cross_entropy(
            forward_batch(wrapped, batch, device), batch["label"].to(device), reduction="none"
        )
        with warnings.catch_warnings():
            # the inputs need no gradient, so torch warns that the full backward hook fires on the outputs'
            # gradients: that is what Opacus relies on (as privacy/fisher.py)
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            losses.sum().backward()
        grad_samples: dict[str, torch.Tensor] = {n: p.grad_sample for n, p in params.items()}  # type: ignore[attr-defined]  # Opacus's per-sample slot
        per_sample = {n: g.reshape(g.shape[0], -1) for n, g in grad_samples.items()}  # (B, *shape) -> (B, d_n)
    finally:
        wrapped._close()
        for p in params.values():
            p.grad = None  # the summed un-clipped gradient must not linger on the working model
            if hasattr(p, "grad_sample"):
                del p.grad_sample
    return per_sample, params, losses.detach()


def joint_clip_factors(per_sample: Mapping[str, torch.Tensor], max_grad_norm: float) -> torch.Tensor:
    """min(1, C / ||g_i||) (B,), the norm over ALL trainable coordinates of patient i (float64 norms)."""
    norms = torch.stack([(g.double() ** 2).sum(dim=1) for g in per_sample.values()]).sum(dim=0).sqrt()  # (B,)
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def group_clip_factors(
    per_sample: Mapping[str, torch.Tensor], clip_bounds: Mapping[str, float], group_of: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """min(1, C_g / ||g_{i,g}||) (B,) by group g; every trainable name must be in ``group_of`` (else it would be
    released unclipped: refused)."""
    unknown = sorted(n for n in per_sample if n not in group_of)
    if unknown:
        raise ConfigError(f"per-group clipping: trainable parameters {unknown[:3]} are in no group; freeze them.")
    squares: dict[str, torch.Tensor] = {}
    for n, g in per_sample.items():
        sq = (g.double() ** 2).sum(dim=1)  # (B,)
        group = group_of[n]
        squares[group] = sq if group not in squares else squares[group] + sq
    return {g: (float(clip_bounds[g]) / (sq.sqrt() + 1e-6)).clamp(max=1.0) for g, sq in squares.items()}


def clipped_per_patient_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], *, max_grad_norm: float, device: torch.device
) -> tuple[State, float]:
    """sum_i g_i min(1, C / ||g_i||) over the patients of ``batch`` and the summed loss, by trainable name.

    The norm is over ALL trainable coordinates of a patient at once (joint, flat clipping: the sensitivity of
    the shared aggregate and the personal sum together is C). Nothing computed here may leave the site
    un-noised.
    """
    per_sample, params, losses = _per_patient_gradients(model, batch, device=device)
    factors = joint_clip_factors(per_sample, max_grad_norm).to(next(iter(per_sample.values())).dtype)
    sums = {n: torch.einsum("b,bd->d", factors, g).view_as(params[n]).detach() for n, g in per_sample.items()}
    return sums, float(losses.sum())


def per_patient_group_clipped_sum(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    clip_bounds: Mapping[str, float],
    group_of: Mapping[str, str],
    device: torch.device,
) -> tuple[State, float]:
    """sum_i c_{i,g}, c_{i,g} = g_{i,g} min(1, C_g / ||g_{i,g}||), by trainable name, and the summed loss.

    Per-patient clipping PER GROUP (as :mod:`mmpfl_core.privacy.group_dp_sgd`): patient i's part of group g
    has norm at most C_g, so group g's sum moves by at most C_g under add/remove of one patient and the whole
    clipped gradient by at most sqrt(sum_g C_g^2). Every trainable name must be in ``group_of`` (else it
    would be released unclipped: refused).
    """
    per_sample, params, losses = _per_patient_gradients(model, batch, device=device)
    factors = group_clip_factors(per_sample, clip_bounds, group_of)
    sums = {
        n: torch.einsum("b,bd->d", factors[group_of[n]].to(g.dtype), g).view_as(params[n]).detach()
        for n, g in per_sample.items()
    }
    return sums, float(losses.sum())


def vmap_per_patient_gradients(
    template: nn.Module,
    model: nn.Module,
    per_patient: Mapping[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    *,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-patient gradients (B, d_n) and losses (B,) where patient i's trainable parameters are its OWN row
    ``per_patient[n][i]`` (B, *shape): ``vmap(grad(CE))`` over patients with ``functional_call`` on
    ``template`` (:func:`~.vectorized.explicit_attention_copy` of ``model``); the frozen parameters and
    buffers are ``model``'s, shared by every patient.

    Hand-written because Opacus' ``GradSampleModule`` differentiates ONE set of parameters for the whole
    batch; patients of different sites (personal copies, masks) are evaluated at different parameters, which
    only a functional transform gives in one pass. Same per-sample gradient as Opacus up to float rounding.
    """
    from torch.func import functional_call, grad_and_value, vmap

    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in per_patient}
    buffers = {n: b for n, b in model.named_buffers()}

    def patient_loss(params, image, mask, clinical, label):  # noqa: ANN001, ANN202 - a vmap body
        logits = functional_call(template, ({**frozen, **params}, buffers), (image[None], mask[None], clinical[None]))
        return nn.functional.cross_entropy(logits, label[None], reduction="sum")

    template.train(model.training)
    grads, losses = vmap(grad_and_value(patient_loss))(
        {n: t.to(device) for n, t in per_patient.items()},
        batch["images"].to(device),
        batch["modality_mask"].to(device),
        batch["clinical"].to(device),
        batch["label"].to(device),
    )
    return {n: g.reshape(g.shape[0], -1).detach() for n, g in grads.items()}, losses.detach()


@dataclass
class _SiteSums:
    """One site's entry of a round's batched computation: its Poisson sample, the inputs and start parameters
    it was computed on (checked again when the site's turn comes), its clipped sums and summed loss."""

    index: torch.Tensor
    batch: dict[str, torch.Tensor]
    start: State
    sums: State
    loss: float


@register_strategy("cross-silo-dp-sgd")
class CrossSiloDPSGD(Strategy):
    """DP-SGD over the union of the sites' patients with secure aggregation (module docstring). Keyword-only.

    Args:
        target_epsilon: patient-level budget over the whole run; z is calibrated for (q, T = num_rounds).
        noise_multiplier: z instead of a target (exactly one of the two). 0 only in tests (epsilon inf).
        max_grad_norm: C, the joint per-patient clip bound.
        delta: patient-level delta; default 1 / (10 N) with N the patients of all sites; larger is refused.
        sample_rate: q, the same Poisson rate at every site, in (0, 1]. Default: ``expected_batch_size`` / N.
        expected_batch_size: patients expected per step over the union (default: the run's
            ``local.batch_size`` per site, times the number of sites).
        accountant: "prv" (default), "rdp" or "pld".
        noise: "secure" (default) or "reproducible-insecure" (tests and teaching only, NOT private).
        personal_groups: parameter groups (``model.parameter_groups()``) whose coordinates stay at each
            site (e.g. ``("head",)``); empty (default): everything trainable is shared.
        server_optimizer: kwargs of :class:`~.server_optimizer.ServerOptimizerConfig`; default Adam at the
            run's ``optimizer.lr``.
        batched_sites: in this in-process simulation, compute every site's clipped sums of a round in ONE
            batched pass (:meth:`batched_clipped_sums`) instead of site by site; each site still gets exactly its
            own per-patient clipped sum (float32 rounding aside), checked against its sample, inputs and start
            parameters when its turn comes. False: the per-site path, the reference. Models with dropout or
            stochastic depth always take the per-site path (their random masks could not be reproduced).
    """

    secret_randomness = True

    def __init__(
        self,
        *,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        delta: float | None = None,
        sample_rate: float | None = None,
        expected_batch_size: int | None = None,
        accountant: str = "prv",
        noise: str = "secure",
        personal_groups: Sequence[str] = (),
        server_optimizer: dict[str, Any] | None = None,
        batched_sites: bool = True,
    ) -> None:
        super().__init__()
        self.secret_randomness = check_noise_mode(noise, "cross-silo DP-SGD")
        self.noise = noise
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ConfigError("cross-silo-dp-sgd needs exactly one of target_epsilon (e.g. 8) or noise_multiplier.")
        if target_epsilon is not None and not 0 < target_epsilon < math.inf:
            raise ConfigError(
                f"cross-silo-dp-sgd target_epsilon={target_epsilon!r} must be finite and > 0; pick a budget such "
                "as 1, 4 or 8."
            )
        if noise_multiplier is not None and not 0 <= noise_multiplier < math.inf:
            raise ConfigError(f"cross-silo-dp-sgd noise_multiplier={noise_multiplier!r} must be finite and >= 0.")
        if not 0 < max_grad_norm < math.inf:
            raise ConfigError(f"cross-silo-dp-sgd max_grad_norm={max_grad_norm!r} must be finite and > 0, e.g. 1.0.")
        if delta is not None and not 0 < delta < 1:
            raise ConfigError(
                f"cross-silo-dp-sgd delta={delta!r} must lie in (0, 1); leave it out for 1/(10 N), N the patients."
            )
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise ConfigError(
                f"cross-silo-dp-sgd sample_rate={sample_rate!r} must lie in (0, 1]: the probability that a patient "
                "is in a step's Poisson batch (1.0: every patient every step)."
            )
        if expected_batch_size is not None and not expected_batch_size >= 1:
            raise ConfigError(f"cross-silo-dp-sgd expected_batch_size={expected_batch_size!r} must be >= 1.")
        if sample_rate is not None and expected_batch_size is not None:
            raise ConfigError("cross-silo-dp-sgd: give sample_rate or expected_batch_size, not both.")
        self.target_epsilon, self.noise_multiplier = target_epsilon, noise_multiplier
        self.max_grad_norm, self.delta, self.accountant = float(max_grad_norm), delta, accountant
        self.sample_rate, self.expected_batch_size = sample_rate, expected_batch_size
        self.personal_groups = tuple(personal_groups)
        self._server_optimizer_spec = server_optimizer
        self.ledger: PrivacyLedger | None = None
        self._m = 0  # sites the current round announced (select / apply_round_instructions)
        self._recorded: set[int] = set()
        self._personal_opt: dict[int, torch.optim.Optimizer] = {}
        self._pending_personal_opt: dict[str, torch.Tensor] = {}
        self.batched_sites = bool(batched_sites)
        self._site_data: dict[int, CohortDataset] = {}
        self._round_sums: dict[int, _SiteSums] = {}  # the current round's batched entries, by site
        self._round_sums_round: int | None = None
        self._vmap_template: nn.Module | None = None
        self.batched_hits = 0  # sites served from the batched pass (tests check the path was taken)

    # ------------------------------------------------------------------ set-up (public inputs only)
    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        if config.client_fraction != 1.0:
            raise ConfigError(
                f"cross-silo-dp-sgd needs every site in every round (client_fraction={config.client_fraction!r}); "
                "set client_fraction=1.0: the noise shares are sized for the m sites a round announces."
            )
        if config.engine != "loop":
            raise ConfigError(f"cross-silo-dp-sgd runs on engine='loop' only (got {config.engine!r}).")
        self._config = config
        # site sizes are public here, as in dp_sgd.py's size caveat: they fix q N and q n_k
        self.site_sizes = {s.site_id: len(s.train) for s in federation.sites}
        self.total = sum(self.site_sizes.values())
        self._site_data = self.client_datasets(federation)  # the batched pass samples every site's patients
        if self.total < 1:
            raise ConfigError("cross-silo-dp-sgd: the sites hold no training patients.")
        if self.sample_rate is None:
            expected = self.expected_batch_size or config.local.batch_size * len(self.site_sizes)
            if expected > self.total:
                raise ConfigError(
                    f"cross-silo-dp-sgd expected_batch_size={expected} exceeds the {self.total} patients (q > 1); "
                    "pass a smaller expected_batch_size or sample_rate=1.0."
                )
            self.sample_rate = expected / self.total
        max_delta = 1.0 / (10 * self.total)
        if self.delta is None:
            self.delta = max_delta
        elif self.delta > max_delta:
            raise ConfigError(
                f"cross-silo-dp-sgd delta={self.delta!r} exceeds 1/(10 N) = {max_delta:.3g} for N = {self.total} "
                "patients; pass a smaller delta or leave it out."
            )
        if self.noise_multiplier is None:
            assert self.target_epsilon is not None  # exactly one (validated)
            self.noise_multiplier = calibrate_noise(
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                sample_rate=self.sample_rate,
                steps=config.num_rounds,
                accountant=self.accountant,
            )
        if self.ledger is None:
            self.ledger = PrivacyLedger(delta=self.delta, accountant=self.accountant)
        group_fn = getattr(model, "parameter_groups", None)
        groups: dict[str, list[str]] = group_fn() if callable(group_fn) else {}
        unknown = [g for g in self.personal_groups if g not in groups]
        if unknown:
            raise ConfigError(
                f"cross-silo-dp-sgd personal_groups {unknown} are not groups of the model; use some of {list(groups)}."
            )
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.personal_names = frozenset(n for g in self.personal_groups for n in groups[g] if n in trainable)
        if self.personal_groups and not self.personal_names:
            raise ConfigError(f"cross-silo-dp-sgd personal_groups {list(self.personal_groups)} hold no trainable one.")
        spec = dict(self._server_optimizer_spec or {"name": "adam", "lr": config.optimizer.lr})
        self.server_optimizer = ServerOptimizer(ServerOptimizerConfig(**spec))

    @property
    def share_std(self) -> float:
        """Std of one site's share in round t: z C / sqrt(m), m the sites the round announced."""
        assert self.noise_multiplier is not None
        return self.noise_multiplier * self.max_grad_norm / math.sqrt(self._m)

    # ------------------------------------------------------------------ server: who takes part
    def select(self, client_ids: Sequence[int], config: FederatedConfig, rng: Any) -> list[int]:
        selected = list(client_ids)  # cross-silo: every site, every round (client_fraction 1 checked)
        self._m = len(selected)
        return selected

    def round_instructions(self, round_index: int, global_state: State) -> dict[str, float]:
        return {"announced_sites": float(self._m)}

    def apply_round_instructions(self, round_index: int, instructions: dict[str, float]) -> None:
        self._m = int(instructions["announced_sites"])
        self.before_round(round_index)

    def before_round(self, round_index: int) -> None:
        # written before any share leaves a site (docs/DESIGN.md 4.8): one subsampled Gaussian step at (q, z)
        assert self.ledger is not None and self.noise_multiplier is not None and self.sample_rate is not None
        if round_index not in self._recorded:
            self.ledger.record(
                name="cross-silo-dp-sgd",
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=1,
                round=round_index,
            )
            self._recorded.add(round_index)

    # ------------------------------------------------------------------ site side
    def broadcast(self, site_id: int, global_state: State) -> State:
        return {n: t for n, t in global_state.items() if n not in self.personal_names}

    def client_start_state(self, site_id: int, global_state: State) -> State:
        return {**global_state, **self.personal.get(site_id, {})}

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        if not self.personal_names:
            return None
        return {**global_state, **self.personal.get(site_id, {})}

    def _gaussian(self, shape: torch.Size, std: float, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            return secure_gaussian(shape, std)
        return torch.randn(shape, generator=generator, dtype=torch.float64).mul_(std).float()

    def noise_share(self, sums: State, generator: torch.Generator | None) -> State:
        """What site k sends for the shared coordinates: its clipped sum plus its share N(0, z^2 C^2 / m I)
        (``generator`` None: from the OS CSPRNG)."""
        return {n: t + self._gaussian(t.shape, self.share_std, generator).to(t.device) for n, t in sums.items()}

    def local_training(
        self,
        model: nn.Module,
        dataset: CohortDataset,
        *,
        site_id: int,
        global_state: State,
        round_index: int,
        config: FederatedConfig,
        generator: torch.Generator,
        device: torch.device,
    ) -> ClientUpdate:
        """Site k's part of the step (module docstring, steps 1-3 and 5): returns the noised SHARED sum
        as ``delta`` (not a parameter difference), and steps the site's personal copy in place."""
        assert self.noise_multiplier is not None
        batch_size, sums, loss, noise_gen = self.site_clipped_sums(
            model, dataset, generator, device, site_id=site_id, round_index=round_index, global_state=global_state
        )
        full_std = self.noise_multiplier * self.max_grad_norm
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        shared = self.noise_share({n: sums[n] for n in names if n not in self.personal_names}, noise_gen)
        if self.personal_names and self.site_sizes.get(site_id, 0) > 0:
            self.step_personal_copy(
                site_id, model, sums, self.personal_names, self.personal_names, lambda n: full_std, noise_gen, config
            )
        return ClientUpdate(
            site_id=site_id,
            delta=shared,
            num_examples=len(dataset),
            num_steps=1,
            train_loss=loss / max(batch_size, 1),
        )

    def clip_batch(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[State, float]:
        """Sum of the batch's per-patient gradients, each clipped jointly to C (step 2), and the summed loss."""
        return clipped_per_patient_sum(model, batch, max_grad_norm=self.max_grad_norm, device=device)

    def site_clipped_sums(
        self,
        model: nn.Module,
        dataset: CohortDataset,
        generator: torch.Generator,
        device: torch.device,
        *,
        site_id: int | None = None,
        round_index: int | None = None,
        global_state: State | None = None,
    ) -> tuple[int, State, float, torch.Generator | None]:
        """Steps 1-2 at one site: its Poisson sample at rate q, the clipped per-patient sums of every trainable
        tensor (:meth:`clip_batch`; zeros for an empty sample, which still sends its noise and is charged), and
        the generator of the site's noise (None when secret: the OS CSPRNG). Returns (batch size, sums, summed
        loss, noise generator).

        With ``batched_sites`` (and the site, round and global model given) the sums come from the round's
        batched pass (:meth:`batched_clipped_sums`, run at the round's first site), but only after checking
        that the pass used this site's sample (drawn again here from its own stream when reproducible), its
        inputs and the parameters the site starts from; otherwise the per-site path runs."""
        assert self.sample_rate is not None
        model.to(device).train()
        noise_gen = batch_gen = None  # secure: OS CSPRNG
        if not self.secret_randomness:
            noise_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            batch_gen = generator
        entry = None
        if self.batched_sites and site_id is not None and round_index is not None and global_state is not None:
            entry = self._batched_entry(model, site_id, round_index, global_state, device)
        if entry is not None:
            index = entry.index if batch_gen is None else poisson_batch(len(dataset), self.sample_rate, batch_gen)
            if self._entry_matches(entry, model, dataset, index):
                self.batched_hits += 1
                return len(index), entry.sums, entry.loss, noise_gen
        else:
            index = poisson_batch(len(dataset), self.sample_rate, batch_gen)
        if len(index) == 0:
            return 0, {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}, 0.0, noise_gen
        sums, loss = self.clip_batch(model, dataset.batch(index), device)
        return len(index), sums, loss, noise_gen

    # ------------------------------------------------------------------ the round's sites in one pass (simulation)
    def patient_clip_factors(self, per_sample: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each patient's clipping factor (B,) by trainable name: :meth:`clip_batch`'s rule (joint, to C)."""
        factor = joint_clip_factors(per_sample, self.max_grad_norm)
        return {n: factor for n in per_sample}

    def _round_samples(self, round_index: int) -> dict[int, torch.Tensor]:
        """Every site's Poisson sample of the round, as its own turn would draw it: from the stream
        ``(seed, 2, t, site)`` after the loop's fork seed and the site's noise seed (reproducible), or from the
        OS CSPRNG (secure; then the site's turn uses this draw)."""
        from ..seeding import Stream, torch_generator

        assert self.sample_rate is not None
        samples = {}
        for site, data in sorted(self._site_data.items()):
            gen = None
            if not self.secret_randomness:
                gen = torch_generator(self._config.seed, Stream.TRAINING, round_index, site)
                torch.randint(2**62, (1,), generator=gen)  # simulation.client_round's fork_rng seed
                torch.randint(2**62, (1,), generator=gen)  # the site's noise seed (site_clipped_sums)
            samples[site] = poisson_batch(len(data), self.sample_rate, gen)
        return samples

    def _batched_entry(
        self, model: nn.Module, site_id: int, round_index: int, global_state: State, device: torch.device
    ) -> _SiteSums | None:
        """The site's entry of the round's batched pass (computed at the round's first site), or None where the
        model has dropout or stochastic depth (per-site path)."""
        from .vectorized import stochastic_modules

        if stochastic_modules(model) or not self._batched_rule_matches():
            return None
        if self._round_sums_round != round_index:
            self._round_sums = self.batched_clipped_sums(model, global_state, self._round_samples(round_index), device)
            self._round_sums_round = round_index
        return self._round_sums.pop(site_id, None)  # used once: a site run again recomputes on its own

    def _batched_rule_matches(self) -> bool:
        """Whether :meth:`patient_clip_factors` is the rule of the :meth:`clip_batch` in force: a subclass that
        overrides ``clip_batch`` without its per-patient factors takes the per-site path (its rule is not known)."""
        mro = type(self).__mro__
        owner = next(i for i, c in enumerate(mro) if "clip_batch" in vars(c))
        return next(i for i, c in enumerate(mro) if "patient_clip_factors" in vars(c)) <= owner

    @staticmethod
    def _entry_matches(entry: _SiteSums, model: nn.Module, dataset: CohortDataset, index: torch.Tensor) -> bool:
        """Whether the batched entry was computed on exactly this site's sample, inputs and start parameters."""
        if not torch.equal(entry.index, index):
            return False
        batch = dataset.batch(index)
        if any(not torch.equal(entry.batch[k], batch[k]) for k in ("images", "modality_mask", "clinical", "label")):
            return False
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return set(trainable) == set(entry.start) and all(
            torch.equal(p.detach(), entry.start[n].to(p.device)) for n, p in trainable.items()
        )

    def batched_clipped_sums(
        self, model: nn.Module, global_state: State, samples: Mapping[int, torch.Tensor], device: torch.device
    ) -> dict[int, _SiteSums]:
        """Every site's clipped per-patient sum and summed loss of a round, in ONE pass over the union batch.

        SIMULATION ONLY: a deployment computes each site's sum at the site (:meth:`clip_batch`). Site k's
        patients are evaluated at k's start parameters theta_k (``client_start_state``), each patient's
        gradient is clipped on its own (:meth:`patient_clip_factors`), and only then summed per site:
        S_k = sum_{i in B_k} clip(g_i(theta_k)), the per-site path's sum, float32 rounding aside. Where every
        site starts from the same parameters (everything shared) this is one Opacus ``GradSampleModule`` pass
        over the union; otherwise each patient carries its site's parameters through ``vmap``
        (:func:`vmap_per_patient_gradients`). Privacy: nothing here is released; each site's entry goes through
        that site's own noise, shares and ledger entry exactly as its per-site sum would.
        """
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        sites = sorted(samples)
        # snapshots of each site's start (its entry is checked against it at its turn); a tensor equal to the
        # global one is stored once for all sites, so memory grows with the personal coordinates only
        snapshot = {n: t.detach().clone() for n, t in global_state.items()}
        starts: dict[int, State] = {}
        for site in sites:
            start = self.client_start_state(site, global_state)
            starts[site] = {
                n: snapshot[n] if n in snapshot and torch.equal(start[n], snapshot[n]) else start[n].detach().clone()
                for n in trainable
                if n in start
            }
        out: dict[int, _SiteSums] = {}
        active = [s for s in sites if len(samples[s]) > 0]
        for site in sites:
            if not active or len(samples[site]) == 0:
                zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
                out[site] = _SiteSums(
                    samples[site], self._site_data[site].batch(samples[site]), starts[site], zeros, 0.0
                )
        if not active:
            return out
        if any(set(starts[s]) != set(trainable) for s in active):
            return out  # a start without every trainable tensor: the per-site path decides (refuses or fills)
        batches = {s: self._site_data[s].batch(samples[s]) for s in active}
        union = {
            k: torch.cat([batches[s][k] for s in active]) for k in ("images", "modality_mask", "clinical", "label")
        }
        site_of = torch.cat([torch.full((len(samples[s]),), i, dtype=torch.long) for i, s in enumerate(active)])
        params = dict(model.named_parameters())
        common = all(
            torch.equal(starts[s][n], params[n].detach().to(starts[s][n].device)) for s in active for n in trainable
        )
        if common:  # every site at the working model's parameters: one Opacus pass over the union
            per_sample, _, losses = _per_patient_gradients(model, union, device=device)
        else:
            from .vectorized import explicit_attention_copy

            if self._vmap_template is None:
                self._vmap_template = explicit_attention_copy(model)
            per_patient = self.per_patient_state([starts[s] for s in active], site_of)
            per_sample, losses = vmap_per_patient_gradients(
                self._vmap_template, model, per_patient, union, device=device
            )
        sums = self.reduce_to_sites(
            per_sample, self.patient_clip_factors(per_sample), site_of.to(losses.device), len(active)
        )
        site_losses = torch.zeros(len(active), dtype=losses.dtype, device=losses.device).index_add_(
            0, site_of.to(losses.device), losses
        )
        for i, site in enumerate(active):
            out[site] = _SiteSums(
                samples[site],
                batches[site],
                starts[site],
                {n: sums[n][i].view_as(params[n]) for n in trainable},
                float(site_losses[i]),
            )
        return out

    @staticmethod
    def per_patient_state(starts: Sequence[State], site_of: torch.Tensor) -> dict[str, torch.Tensor]:
        """Patient i's trainable parameters: row i is its site's start (``starts[site_of[i]]``), (B, *shape)."""
        return {
            n: torch.stack([s[n] for s in starts]).index_select(0, site_of.to(starts[0][n].device)) for n in starts[0]
        }

    @staticmethod
    def reduce_to_sites(
        per_sample: Mapping[str, torch.Tensor],
        factors: Mapping[str, torch.Tensor],
        site_of: torch.Tensor,
        num_sites: int,
    ) -> dict[str, torch.Tensor]:
        """sum over each site's patients of the CLIPPED per-patient gradients: (num_sites, d_n) by name."""
        out = {}
        for n, g in per_sample.items():
            clipped = g * factors[n].to(g.dtype).unsqueeze(1)
            out[n] = torch.zeros(num_sites, g.shape[1], dtype=g.dtype, device=g.device).index_add_(0, site_of, clipped)
        return out

    def step_personal_copy(
        self,
        site_id: int,
        model: nn.Module,
        sums: State,
        copied: Collection[str],
        active: Collection[str],
        std_of: Callable[[str], float],
        noise_gen: torch.Generator | None,
        config: FederatedConfig,
    ) -> None:
        """Step 5: (sum_i gbar_i[n] + N(0, std_of(n)^2 I)) / (q n_k) for every tensor n in ``active``, stepped by
        the site's own optimiser on its personal copy. The copy (and its optimiser) hold the tensors ``copied``,
        cloned from the model on the site's first step; a copied tensor outside ``active`` gets no gradient."""
        assert self.sample_rate is not None
        params = dict(model.named_parameters())
        if site_id not in self.personal:
            self.personal[site_id] = {n: params[n].detach().clone() for n in sorted(copied)}
        state = self.personal[site_id]
        leaves = {n: t.requires_grad_(True) for n, t in state.items()}
        if site_id not in self._personal_opt:
            self._personal_opt[site_id] = build_optimizer(list(leaves.values()), config.optimizer)
            self._restore_personal_opt(site_id)
        denominator = self.sample_rate * self.site_sizes[site_id]
        for n, leaf in leaves.items():
            if n not in active:
                continue
            noisy = sums[n] + self._gaussian(sums[n].shape, std_of(n), noise_gen).to(sums[n].device)
            leaf.grad = (noisy / denominator).to(leaf.dtype)
        self._personal_opt[site_id].step()
        for leaf in leaves.values():
            leaf.grad = None

    # ------------------------------------------------------------------ what leaves a site, and the server
    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        leaked = self.personal_names.intersection(update.delta)
        if leaked:  # a defect, never a configuration: personal coordinates must not reach the aggregate
            raise RuntimeError(f"cross-silo-dp-sgd: personal tensors {sorted(leaked)} would be sent.")
        return update.delta

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State], round_index: int
    ) -> State:
        """sum_k S_k + top-up N(0, z^2 C^2 (m - s) / m), over q N, then the server optimiser's step."""
        return self.aggregate_shared(global_state, sent, self.shared_names(global_state, round_index), round_index)

    def shared_names(self, global_state: State, round_index: int) -> list[str]:
        """The tensors the secure sum carries this round: every one outside the personal groups."""
        return [n for n in global_state if n not in self.personal_names]

    def aggregate_noise_std(self, name: str) -> float:
        """Std of the aggregate's noise on tensor ``name``: z C on every coordinate."""
        assert self.noise_multiplier is not None
        return self.noise_multiplier * self.max_grad_norm

    def aggregate_shared(
        self, global_state: State, sent: Sequence[State], shared: Sequence[str], round_index: int
    ) -> State:
        """Step 4 over the tensors ``shared``: sum the shares, top up the missing ones' variance (so the sum
        carries aggregate_noise_std(n)^2 whoever sent), divide by the fixed q N, step the server optimiser."""
        assert self.sample_rate is not None
        missing = max(self._m - len(sent), 0)
        noise_gen = None
        if not self.secret_randomness:
            noise_gen = torch.Generator().manual_seed(int(self._config.seed) * 1_000_003 + round_index)
        denominator = self.sample_rate * self.total
        aggregated = {}
        for n in shared:
            total = torch.zeros_like(global_state[n])
            for s in sent:
                total = total + s[n].to(total.device)
            if missing:
                std = self.aggregate_noise_std(n) * math.sqrt(missing / self._m)
                total = total + self._gaussian(total.shape, std, noise_gen).to(total.device)
            aggregated[n] = global_state[n] - total / denominator  # pseudo-average: theta - g
        stepped = self.server_optimizer.step({n: global_state[n] for n in shared}, aggregated)
        return {**global_state, **stepped}

    # ------------------------------------------------------------------ reporting
    def epsilon(self) -> float:
        """Patient-level epsilon so far, from the accountant (the same for every patient of every site)."""
        assert self.ledger is not None
        return self.ledger.epsilon()

    def round_report(self, round_index: int) -> dict[str, float]:
        return {"sample_epsilon_max": self.epsilon()}

    def summary_report(self) -> dict[str, Any]:
        eps = self.epsilon()
        out: dict[str, Any] = {
            "privacy_unit": PRIVACY_UNIT,
            "per_site_epsilon": {k: eps for k in sorted(self.site_sizes)},
            "max_epsilon": eps,
            "delta": self.delta,
            "accountant": self.accountant,
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "expected_batch": (self.sample_rate or 0.0) * self.total,
            "steps": len(self.ledger or []),
            "personal_groups": list(self.personal_groups),
            "noise": self.noise,
        }
        if self.noise != "secure":
            out["not_private"] = NOT_PRIVATE_WARNING
        return {"sample_level_privacy": out}

    def attach_ledger_journals(self, *, server, site, sites) -> None:  # noqa: ANN001 - as SampleLevelHooks
        """The one patient-level ledger journals to the server's file: its entries are public (q, z, round)."""
        assert self.ledger is not None
        self.ledger.attach_journal(server)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, _ = super().state_dict()
        tensors = {n: t.detach() for n, t in tensors.items()}
        tensors.update(self.server_optimizer.state_dict())
        for site, opt in self._personal_opt.items():
            for index, slots in opt.state_dict()["state"].items():
                for key, value in slots.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"{_PERSONAL_OPT_PREFIX}{site}/{index}/{key}"] = value
        assert self.ledger is not None
        return tensors, {
            "ledger": self.ledger.state_dict(),
            "recorded": sorted(self._recorded),
            "noise_multiplier": self.noise_multiplier,
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        own, rest = split_server_optimizer_tensors(tensors)
        self.server_optimizer.load_state_dict(own)
        self._pending_personal_opt = {k: v for k, v in rest.items() if k.startswith(_PERSONAL_OPT_PREFIX)}
        super().load_state_dict({k: v for k, v in rest.items() if not k.startswith(_PERSONAL_OPT_PREFIX)}, state)
        self._personal_opt = {}
        self.ledger = PrivacyLedger.from_state_dict(state["ledger"])
        self._recorded = set(state["recorded"])
        self.noise_multiplier = float(state["noise_multiplier"])

    def _restore_personal_opt(self, site_id: int) -> None:
        prefix = f"{_PERSONAL_OPT_PREFIX}{site_id}/"
        mine = {k[len(prefix) :]: v for k, v in self._pending_personal_opt.items() if k.startswith(prefix)}
        if not mine:
            return
        opt = self._personal_opt[site_id]
        saved = opt.state_dict()
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in mine.items():
            index, slot = key.split("/", 1)
            slots.setdefault(int(index), {})[slot] = value
        saved["state"] = slots
        opt.load_state_dict(saved)
