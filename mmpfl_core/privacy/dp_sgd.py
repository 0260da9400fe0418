"""Sample-level (per-patient) DP-SGD inside each site, with per-site accounting (docs/DESIGN.md 4.5).

Algorithm of one local step at site k (Abadi et al. 2016, "Deep learning with differential
privacy"; implemented with Opacus' ``GradSampleModule`` + ``DPOptimizer``):
    1. Poisson-sample the batch: every patient of the site independently with rate q_k = B / n_k
       (the batch may be empty; the step then releases noise only and is still charged).
    2. Per-sample gradients g_i (Opacus hooks; the model's embedding modules register their own
       grad samplers), each clipped to norm at most C (``max_grad_norm``).
    3. g = (sum_i clip(g_i) + N(0, z^2 C^2 I)) / B (the expected batch size: fixed denominator).
    4. An optimiser step with g.
Unit of privacy: one patient (add/remove-one-patient adjacency) at one site. A site's releases are
all its parameters after local training, which are post-processing of the noisy gradients, so its
epsilon is that of the T_k steps it took over all rounds it took part in, each a subsampled
Gaussian (z, q_k): :class:`SampleLevelDP` keeps one :class:`PrivacyLedger` per site. This protects
patients against everyone, the site's own released updates included, and composes with
client-level DP (both can be on).

Why Opacus' hooks mode: it was the fastest correct grad-sample mode on the teaching preset on two
CPU cores (1.57x a non-private step, against 1.75x for functorch and 2.48x for ghost clipping; all
three gave the same zero-noise update; ``bench/results/dp_sgd_modes_cpu2.md``), and the kit's
embedding modules carry exact hook rules (``mmpfl_core.models.layers``). Ghost clipping saves
memory (1.06x vs 1.14x) and is the one to wire in when memory, not time, binds (paper scale on a GPU).

Must never release: per-sample gradients or norms, the Poisson sample, the noise or its seed.
Caveat: site sizes n_k set q_k; a strategy that weights by n_k releases n_k (outside the guarantee).

Per-group variant (``group_allocation``, :mod:`mmpfl_core.privacy.group_dp_sgd`): step 2 clips each
parameter group g of g_i to C_g (sum_g C_g^2 = C^2) and step 3 adds N(0, sigma_g^2 I) per group, with
sigma_g the Fisher (public set) or uniform allocation at z; the step is then the Gaussian mechanism
with z_eff = (sum_g C_g^2 / sigma_g^2)^(-1/2) = z (checked), and the ledger is charged with z_eff.

Randomness: with ``noise="secure"`` (the default) the Poisson batches and the gradient noise come
from the OS CSPRNG (:mod:`mmpfl_core.privacy.randomness`): the noise through
:class:`SecureNoiseDPOptimizer`, a ``DPOptimizer`` whose ``add_noise`` draws from it, because
Opacus' own ``secure_mode`` needs ``torchcsprng``, which current torch cannot install. With
``noise="reproducible-insecure"`` both come from the site's seeded stream: NOT private (anyone with
the seed regenerates them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable

import torch
from torch import nn

from mmpfl_core.errors import ConfigError
from mmpfl_core.privacy.accounting import calibrate_noise
from mmpfl_core.privacy.group_dp_sgd import GROUP_ALLOCATIONS, GroupNoise, make_group_optimizer
from mmpfl_core.privacy.ledger import PrivacyLedger
from mmpfl_core.privacy.randomness import secure_standard_normal, secure_uniform
from mmpfl_core.privacy.release import check_noise_mode

__all__ = ["PrivateTraining", "SampleLevelDP", "make_private", "poisson_batch"]


@dataclass(frozen=True)
class PrivateTraining:
    """What one site needs for one round of DP-SGD (built by :meth:`SampleLevelDP.training_for`)."""

    noise_multiplier: float  # z: noise std / C
    max_grad_norm: float  # C: per-sample clip bound
    sample_rate: float  # q_k = B / n_k
    expected_batch_size: int  # B
    grad_sample_mode: str = "hooks"
    secret_randomness: bool = True  # batches and noise from the OS CSPRNG (False: from the seed, not private)
    group_noise: GroupNoise | None = None  # per-group clipping C_g and noise sigma_g (None: flat C, z C)

    @property
    def accounted_multiplier(self) -> float:
        """The multiplier the ledger is charged with: z, or z_eff of the per-group noise (equal to z, checked
        when :class:`~mmpfl_core.privacy.group_dp_sgd.GroupNoise` is built)."""
        return self.noise_multiplier if self.group_noise is None else self.group_noise.noise_multiplier


def poisson_batch(num_examples: int, sample_rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of one Poisson-sampled batch: each example independently with probability q.

    ``generator=None`` draws the coins from the OS CSPRNG (private runs); a generator makes the
    batch reproducible from its seed (not private).
    """
    if generator is None:
        coins = torch.from_numpy(secure_uniform(num_examples))
    else:
        coins = torch.rand(num_examples, generator=generator)
    return torch.nonzero(coins < sample_rate).flatten()


def _secure_optimizer_class():
    """``DPOptimizer`` subclass whose Gaussian noise comes from the OS CSPRNG (built lazily: opacus
    is imported only when DP-SGD is used)."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class SecureNoiseDPOptimizer(DPOptimizer):
        """DPOptimizer with N(0, (z C)^2) noise from :func:`secure_standard_normal` (no generator, no state).

        Same maths as ``DPOptimizer.add_noise`` (sum of clipped per-sample gradients plus noise,
        scaled later by 1/B); only the source of the Gaussian draws differs.
        """

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = secure_standard_normal(p.summed_grad.shape, dtype=torch.float64) * std
                p.grad = (p.summed_grad + noise.to(p.summed_grad.device, p.summed_grad.dtype)).view_as(p)
                _mark_as_processed(p.summed_grad)

    return SecureNoiseDPOptimizer


def make_private(
    *, module: nn.Module, optimizer: torch.optim.Optimizer, training: PrivateTraining, generator: torch.Generator | None
):
    """Wrap ``module`` in a ``GradSampleModule`` and ``optimizer`` in a ``DPOptimizer`` (with
    ``training.group_noise``: a per-group ``GroupDPOptimizer``, :mod:`mmpfl_core.privacy.group_dp_sgd`).

    Returns (wrapped module, DP optimiser). Call ``wrapped._close()`` afterwards to remove the
    hooks from ``module`` (it is the caller's working model). With
    ``training.secret_randomness`` the noise comes from the OS CSPRNG and ``generator`` must be
    None; otherwise ``generator`` seeds the noise (reproducible, not private).
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    if training.grad_sample_mode != "hooks":
        raise ConfigError(
            f"grad_sample_mode={training.grad_sample_mode!r}: only 'hooks' is wired here "
            "(Poisson batches and empty steps are handled by the caller)."
        )
    if training.secret_randomness and generator is not None:
        raise ConfigError("secret DP-SGD noise takes no generator (a seeded generator would make it regenerable).")
    if training.group_noise is not None:  # per-group clipping and noise (privacy/group_dp_sgd.py)
        if training.group_noise.noise_multiplier != training.noise_multiplier:
            raise ConfigError(
                f"per-group DP-SGD noise has z_eff={training.group_noise.noise_multiplier!r} but the site's "
                f"multiplier is {training.noise_multiplier!r}; build it with plan.noise_for(z)."
            )
        # the optimiser first: a parameter outside every group is refused before any hook is attached
        group_opt = make_group_optimizer(
            module=module,
            optimizer=optimizer,
            group_noise=training.group_noise,
            expected_batch_size=training.expected_batch_size,
            generator=generator,
            secure=training.secret_randomness,
        )
        return GradSampleModule(module, batch_first=True, loss_reduction="mean"), group_opt
    wrapped = GradSampleModule(module, batch_first=True, loss_reduction="mean")
    optimizer_class = _secure_optimizer_class() if training.secret_randomness else DPOptimizer
    dp_opt = optimizer_class(
        optimizer,
        noise_multiplier=training.noise_multiplier,
        max_grad_norm=training.max_grad_norm,
        expected_batch_size=training.expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    return wrapped, dp_opt


class SampleLevelDP:
    """Per-site DP-SGD settings and per-site ledgers. Keyword-only arguments.

    Args:
        noise_multiplier: z for every site; or ``target_epsilon``: z_k calibrated per site so that
            a site taking part in EVERY round stays within the budget (an upper bound).
        max_grad_norm: per-sample clip bound C.
        delta: per-site delta (should be << 1 / n_k).
        accountant: "prv", "rdp" or "pld".
        noise: "secure" (default: batches and noise from the OS CSPRNG) or "reproducible-insecure"
            (from each site's seeded stream: teaching and tests only, NOT private).
        group_allocation: None (flat clipping at C, noise z C), or ``"fisher"`` / ``"uniform"``: per-group
            clipping and noise (:mod:`mmpfl_core.privacy.group_dp_sgd`); only strategies that plan the
            groups each round from public data accept it (MM-PFL-ADP).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        max_grad_norm: float = 1.0,
        delta: float = 1e-5,
        accountant: str = "prv",
        noise: str = "secure",
        group_allocation: str | None = None,
    ) -> None:
        check_noise_mode(noise, "sample-level DP-SGD")
        if group_allocation is not None and group_allocation not in GROUP_ALLOCATIONS:
            raise ConfigError(
                f"sample-level group_allocation={group_allocation!r} is unknown; use one of "
                f"{list(GROUP_ALLOCATIONS)}, or leave it out for flat clipping."
            )
        self.group_allocation = group_allocation
        self.noise = noise
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ConfigError("sample-level DP needs exactly one of noise_multiplier or target_epsilon.")
        if noise_multiplier is not None and not 0 < noise_multiplier < math.inf:
            raise ConfigError(f"sample-level noise_multiplier={noise_multiplier!r} must be finite and > 0.")
        if target_epsilon is not None and not 0 < target_epsilon < math.inf:
            raise ConfigError(f"sample-level target_epsilon={target_epsilon!r} must be finite and > 0.")
        if not 0 < max_grad_norm < math.inf:
            raise ConfigError(f"sample-level max_grad_norm={max_grad_norm!r} must be finite and > 0.")
        if not 0 < delta < 1:
            raise ConfigError(f"sample-level delta={delta!r} must lie in (0, 1), e.g. 1e-5.")
        self.noise_multiplier, self.target_epsilon = noise_multiplier, target_epsilon
        self.max_grad_norm, self.delta, self.accountant = float(max_grad_norm), float(delta), accountant
        self.ledgers: dict[int, PrivacyLedger] = {}
        self._journal_for: Callable[[int], Path] | None = None  # site -> write-ahead ledger file
        self._z: dict[int, float] = {}
        self._calibrated: dict[tuple[float, int], float] = {}

    def training_for(
        self, site_id: int, *, num_examples: int, batch_size: int, steps_per_round: int, num_rounds: int
    ) -> PrivateTraining:
        """Settings of site ``site_id`` (q_k = min(1, B / n_k)); calibrates z_k on first use."""
        if num_examples < 1:
            raise ConfigError(f"site {site_id} has no training examples; DP-SGD needs at least one.")
        q = min(1.0, batch_size / num_examples)
        if site_id not in self._z:
            steps = steps_per_round * num_rounds
            if self.noise_multiplier is not None:
                self._z[site_id] = self.noise_multiplier
            else:  # sites with the same (q, steps) share one calibration (hundreds of sites in a sweep)
                key = (q, steps)
                if key not in self._calibrated:
                    assert self.target_epsilon is not None  # exactly one of z / target_epsilon (validated)
                    self._calibrated[key] = calibrate_noise(
                        target_epsilon=self.target_epsilon,
                        target_delta=self.delta,
                        sample_rate=q,
                        steps=steps,
                        accountant=self.accountant,
                    )
                self._z[site_id] = self._calibrated[key]
        return PrivateTraining(
            noise_multiplier=self._z[site_id],
            max_grad_norm=self.max_grad_norm,
            sample_rate=q,
            expected_batch_size=max(1, round(q * num_examples)),
            secret_randomness=self.noise == "secure",
        )

    def record(self, site_id: int, training: PrivateTraining, steps: int, round_index: int) -> None:
        """Charge site ``site_id`` for the ``steps`` DP-SGD steps it took in ``round_index``.

        Called by the site before its update leaves it; with journals attached the entry is on disk
        (fsynced) when this returns (:mod:`mmpfl_core.privacy.ledger`, write-ahead journal).
        """
        ledger = self._ledger_of(site_id)
        ledger.record(
            name="dp-sgd" if training.group_noise is None else "dp-sgd-per-group",
            noise_multiplier=training.accounted_multiplier,
            sample_rate=training.sample_rate,
            steps=steps,
            round=round_index,
        )

    def _ledger_of(self, site_id: int) -> PrivacyLedger:
        if site_id not in self.ledgers:
            ledger = PrivacyLedger(delta=self.delta, accountant=self.accountant)
            if self._journal_for is not None:  # adopts the file's entries if the site has one
                ledger.attach_journal(self._journal_for(site_id))
            self.ledgers[site_id] = ledger
        return self.ledgers[site_id]

    def attach_journals(self, path_for_site: Callable[[int], Path], sites: Iterable[int] = ()) -> None:
        """Give every site's ledger a write-ahead file, ``path_for_site(site)``; ledgers created later
        get theirs on creation. ``sites``: sites that already have a file (a resumed run), whose
        entries are adopted (:meth:`PrivacyLedger.attach_journal`: a checkpoint's entries must be a
        prefix of the file's). One file per site: a site's ledger is its own (its participation and
        step counts are private to it)."""
        self._journal_for = path_for_site
        for site in sorted({int(s) for s in sites} | set(self.ledgers)):
            if site in self.ledgers:
                self.ledgers[site].attach_journal(path_for_site(site))
            else:
                self._ledger_of(site)

    def epsilons(self) -> dict[int, float]:
        """Per-site epsilon so far, from each site's accountant."""
        return {site: ledger.epsilon() for site, ledger in sorted(self.ledgers.items())}

    def max_epsilon(self) -> float:
        return max(self.epsilons().values(), default=0.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "ledgers": {str(k): v.state_dict() for k, v in self.ledgers.items()},
            "z": {str(k): v for k, v in self._z.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledgers = {int(k): PrivacyLedger.from_state_dict(v) for k, v in state["ledgers"].items()}
        self._z = {int(k): float(v) for k, v in state["z"].items()}
        if self._journal_for is not None:  # the files stay the ledgers of the run: re-adopt them
            self.attach_journals(self._journal_for)
