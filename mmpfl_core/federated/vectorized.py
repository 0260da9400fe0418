"""The vectorised engine: the sampled sites of a round train together, as one batched computation.

``engine: vectorized`` (``FederatedConfig.engine``, ``mmpfl train --engine vectorized``) runs the
same round as the loop engine (:class:`~.simulation.FederatedSimulation`, the reference and the
default) and differs only in how step 2 (local training) is computed:

1. Every selected site draws its batches exactly as :func:`~.simulation.client_round` does: from
   the stream ``(seed, 2, t, site)``, first the seed the loop engine would give torch's forked RNG
   (unused here: models with dropout are refused, so nothing else is random), then
   :func:`~.client.batch_schedule`. Same batches, same order.
2. Sites are sorted by their batch schedules and cut into chunks of at most ``chunk_size`` (set,
   or sized from free memory: :func:`auto_chunk_size`), also where padding would waste more than
   ~30% (:func:`plan_chunks`): activations and optimiser state are bounded by the chunk, not by the
   number of sites. (The per-site updates of a round are kept until the release, as the loop engine
   keeps them: 4 d bytes a site, 78 MB per 1,000 sites on the regime map's model.)
3. In a chunk the parameters of its S sites are stacked along a leading site axis (S, *shape), and
   each local step is one call of ``vmap(grad(loss))`` over (per-site parameters, per-site batch)
   with :func:`torch.func.functional_call` on a copy of the model whose attention is explicit and
   whose patch embeddings are matrix products (:func:`explicit_attention_copy`): the same FLOPs as training the sites one after another, in a
   few large batched kernels instead of thousands of small ones. Batches of unequal size are
   padded; a padded example has weight 0 in the site's loss ``sum_i w_i CE_i / sum_i w_i`` (the mean
   over its real examples), so it contributes exactly zero gradient. Sites whose schedule has no
   k-th step are left out of step k (neither computed nor updated).
   Step 1 is cheaper: where every site of the chunk starts from the same parameters (the broadcast
   global model of FedAvg, FedProx and DP-FedAvg; MM-PFL-ADP's shared part), those enter ``vmap``
   unbatched, so the forward pass and the input gradients are single large matrix products over
   all the chunk's examples, as in centralised training, and only the weight-gradient reductions
   are per site (batched products over each site's examples). With ~8 training subjects a site and
   batches of 16 (the regime map), step 1 is the whole epoch.
4. The optimiser state is stacked the same way; :class:`_StackedOptimizer` is torch's SGD (with
   momentum, weight decay) and AdamW written out for (S, *shape) tensors, because ``torch.optim``
   updates whole tensors and cannot step a subset of rows. Clients are stateless across rounds, as
   in :func:`~.client.build_optimizer`: fresh state every round, so the first step is taken in
   closed form (:meth:`_StackedOptimizer.first_step`; AdamW: ``-lr wd theta_0 - lr g / (|g| +
   eps)``) and writes the update ``theta_1 - theta_0`` directly; the site's parameters are
   materialised only when it has a second step.

The release goes through the strategy, never around it. Each site's :class:`~.client.ClientUpdate`
is a row of the stacked result; site by site, in the selected order, it goes through the
strategy's own ``after_local`` (with the site's trained parameters loaded into the working model),
``transmit`` and ``broadcast``, then ``aggregate``, exactly as in the loop engine. One case is
stacked: DP-FedAvg (and its Fisher variant) with trusted-server noise and fixed clipping, whose
``transmit`` + ``aggregate`` only clip each update per group and sum, gets that clipped sum from
:func:`clipped_sum` (one pass over the stacked updates, norms in float64 like
:func:`~mmpfl_core.privacy.clipping.clip_per_group`) and hands it to the strategy's public
``release_sum`` (noise, fixed denominator qN, ledger entry), the entry point of engines that only
see a sum (secure aggregation); a non-finite update sends the round back to the per-site path,
which rejects and logs it. Likewise FedAvg and FedProx, whose ``transmit`` sends the delta as it
is and whose ``aggregate`` is the sample-weighted mean (linear in the updates), get
``sum_k n_k Delta_k`` reduced chunk by chunk and handed to their own ``aggregate`` as one
pre-reduced update of weight ``sum_k n_k`` (:func:`_releases_a_weighted_mean`). Poisson sampling, secret noise, the ledger, the epsilon reported,
checkpoint/resume and the run directory are the loop engine's own code (this class overrides only
``train_clients``, ``aggregate`` and ``count_traffic`` of :class:`~.simulation.FederatedSimulation`).
Privacy: this module releases nothing itself. It computes the same site-private updates as the loop
engine, and the stacked clipped sum equals the strategy's own, so the mechanism and its accounting
are unchanged (``tests/test_vectorized.py``: released global models equal round by round within
float32 tolerance and the same epsilon, for every strategy served; the stacked clip-and-sum against
``transmit`` + ``aggregate``, with an unclipped and a flat-clipped variant caught).

What it serves (:data:`VECTORIZED_STRATEGIES`): FedAvg (with server optimisers), FedProx (its
proximal term is evaluated on the stacked parameters), local-only, centralized, DP-FedAvg in every
noise placement, DP-FedAvg-Fisher and MM-PFL-ADP (its KL masks run in ``after_local`` on each
site's trained model). It refuses, naming ``engine: loop``: other strategies (their local objective
or second model is not vectorised), sample-level DP-SGD inside sites (Opacus' per-sample clipping
and noise are not reproduced here), and models with dropout or stochastic depth (the loop engine's
masks could not be reproduced, so the engines would not be equivalent).

Equivalence holds up to float rounding, which AdamW can amplify: a coordinate whose gradient is
(near) zero, such as an attention key bias, moves by up to +-lr with the sign of rounding noise in
either engine. With SGD the engines agree to ~1e-5.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..data.contract import CohortDataset
from ..errors import ConfigError
from ..seeding import Stream, torch_generator
from .client import ClientUpdate, batch_schedule
from .config import LocalTrainingConfig, OptimizerConfig
from .simulation import ENGINES, FederatedSimulation
from .strategies import State, Strategy

if TYPE_CHECKING:  # imported at run time where needed (the stacked release is for DPFedAvg only)
    from .dp_strategies import DPFedAvg

__all__ = [
    "VECTORIZED_STRATEGIES",
    "VectorizedSimulation",
    "auto_chunk_size",
    "check_vectorizable",
    "site_batches",
    "train_stacked",
]

#: Registered strategies whose site half is plain local training (plus FedProx's proximal term) and
#: per-site hooks, which this engine reproduces exactly. Anything else: ``engine: loop``.
VECTORIZED_STRATEGIES = ("fedavg", "fedprox", "local", "centralized", "dp-fedavg", "dp-fedavg-fisher", "mm-pfl-adp")

#: Upper bound of the automatic chunk on a CPU. The batched kernels stop getting faster beyond a few
#: dozen sites (the linear-patch model, one local step of 1,000 sites on 2 cores: chunks of 100 and
#: 250 sites took 0.51 and 0.54 s, one chunk of 1,000 took 1.26 s), while larger chunks make larger
#: temporaries, which glibc's allocator maps and unmaps on every allocation past its mmap threshold:
#: the page faults show up as system CPU time. On the conv-stem model of the regime map (1,000 sites,
#: one thread, default allocator, interleaved runs) chunks of 64 sites cost 1.51-1.62 s of user and
#: 0.05-0.20 s of system CPU a round, chunks of 256 1.53-1.55 s and 0.49-0.70 s; chunks of 32, 1.79 s
#: of user CPU.
MAX_AUTO_CHUNK = 64
#: The same bound on a GPU, where larger kernels keep paying (no allocator churn: torch caches CUDA memory).
MAX_AUTO_CHUNK_CUDA = 256


def check_vectorizable(strategy: Strategy, model: nn.Module) -> None:
    """Raise :class:`ConfigError` (naming ``engine: loop``) for what this engine cannot reproduce."""
    if strategy.name not in VECTORIZED_STRATEGIES:
        raise ConfigError(
            f"engine='vectorized' does not serve strategy {strategy.name!r} (it serves "
            f"{list(VECTORIZED_STRATEGIES)}); run it with federated.engine: loop (--engine loop)."
        )
    if getattr(strategy, "sample_dp", None) is not None:
        raise ConfigError(
            "engine='vectorized' does not run sample-level DP-SGD inside sites (sample_level_dp): "
            "Opacus' per-sample clipping and noise run in the loop engine only; use "
            "federated.engine: loop (--engine loop)."
        )
    stochastic = stochastic_modules(model)
    if stochastic:
        raise ConfigError(
            f"engine='vectorized' needs a model without dropout or stochastic depth "
            f"(found {stochastic[:3]}): "
            "the loop engine's random masks could not be reproduced. Set drop_rate=0 and "
            "drop_path_rate=0, or use federated.engine: loop (--engine loop)."
        )


def stochastic_modules(model: nn.Module) -> list[str]:
    """Names of the modules with dropout or stochastic depth (random masks a batched pass cannot reproduce)."""
    return [
        name
        for name, m in model.named_modules()
        if (isinstance(m, nn.Dropout) and m.p > 0) or getattr(m, "drop_prob", 0.0) > 0
    ]


def site_batches(
    num_examples: int, training: LocalTrainingConfig, *, seed: int, round_index: int, site_id: int
) -> list[torch.Tensor]:
    """The batches :func:`~.simulation.client_round` gives site ``site_id`` in round t, in order.

    The loop engine first draws from the stream ``(seed, 2, t, site)`` the seed of torch's forked
    global RNG (dropout), then shuffles from the same stream; the first draw is repeated here so the
    shuffles are identical.
    """
    generator = torch_generator(seed, Stream.TRAINING, round_index, site_id)
    torch.randint(2**62, (1,), generator=generator)  # the loop engine's fork_rng seed (no dropout here)
    return batch_schedule(num_examples, training, generator)


class _StackedRow(Mapping[str, torch.Tensor]):
    """Site ``row``'s entry of a chunk's stacked tensors: a read-only mapping name -> ``stacked[name][row]``
    (a view, no copy), made when a name is looked up.

    What a dict of per-site views would give, without building S x (number of parameters) views up front:
    40,000 tensor views per round at 1,000 sites on the regime map's model (cProfile put them at 0.26 s of a
    FedAvg round; interleaved runs without cProfile, 1-4% of its user CPU), while the stacked releases
    (:func:`clipped_sum`, the weighted sum) never look at a site's row and the traffic ledger only at its
    names. A strategy that reads a site's update (``transmit``, ``after_local``'s model load) gets the same
    tensors as from such a dict; one that tried to write into it would fail loudly (no ``__setitem__``).
    ``tests/test_vectorized.py`` checks every site's row against the loop engine's update.
    """

    __slots__ = ("_stacked", "_row")

    def __init__(self, stacked: dict[str, torch.Tensor], row: int) -> None:
        self._stacked, self._row = stacked, row

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._stacked[name][self._row]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stacked)

    def __len__(self) -> int:
        return len(self._stacked)


def _stacked_rows(stacked: dict[str, torch.Tensor], num_rows: int) -> list[dict[str, torch.Tensor]]:
    """S lazy rows (:class:`_StackedRow`), typed as the ``dict`` :class:`~.client.ClientUpdate` declares:
    read-only, which no strategy served here needs more than (each builds its own dict to transmit)."""
    return [cast("dict[str, torch.Tensor]", _StackedRow(stacked, k)) for k in range(num_rows)]


def _releases_a_clipped_sum(strategy: Strategy) -> bool:
    """Whether the round's release may be computed as one stacked clip-and-sum (:func:`clipped_sum`)
    handed to the strategy's ``release_sum``: DP-FedAvg (and its Fisher variant) with trusted-server
    noise, no adaptive clipping and the strategy's own ``transmit``/``aggregate`` (which, for this
    placement, clip each update per group and sum: nothing else). Every other case goes through the
    strategy's per-site hooks. ``tests/test_vectorized.py`` checks both give the same release."""
    from ..privacy import NoisePlacement
    from .dp_strategies import DPFedAvg

    return (
        strategy.name in ("dp-fedavg", "dp-fedavg-fisher")
        and isinstance(strategy, DPFedAvg)
        and type(strategy).transmit is DPFedAvg.transmit
        and type(strategy).aggregate is DPFedAvg.aggregate
        and strategy.placement is NoisePlacement.SERVER
        and not strategy.adaptive
        and strategy.sample_dp is None
    )


def _releases_a_weighted_mean(strategy: Strategy) -> bool:
    """Whether the round's aggregate is the base class's sample-weighted mean of untouched updates
    (FedAvg with or without a server optimiser, FedProx): ``transmit`` sends the delta as it is and
    ``aggregate`` is :func:`~.strategies.weighted_average_update` (then FedAvg's server step), which
    is linear in the updates. Then the stacked engine reduces ``sum_k n_k Delta_k`` chunk by chunk and
    hands the strategy's own ``aggregate`` one pre-reduced update of weight ``sum_k n_k``: the same
    mean, without unstacking a thousand updates and stacking them again (~8% of a round's CPU at 1,000
    sites, measured with cProfile before this path)."""
    from .strategies import FedAvg

    return type(strategy).transmit is Strategy.transmit and type(strategy).aggregate in (
        Strategy.aggregate,
        FedAvg.aggregate,
    )


class _PatchLinear(nn.Module):
    """A patch embedding's ``Conv2d`` with kernel = stride (no padding, dilation or groups) as one
    matrix product over the image's non-overlapping patches: the same map with the same parameters
    (``weight`` (D, C, p, p), ``bias`` (D,)), but under ``vmap`` over per-site weights it is one
    batched matrix product, where the convolution became a grouped convolution that cost 15% of a
    vectorised round (forward and backward) on the regime map's model."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias, self.patch = conv.weight, conv.bias, conv.kernel_size[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
        out = patches.reshape(B, (H // p) * (W // p), C * p * p) @ self.weight.reshape(self.weight.shape[0], -1).T
        if self.bias is not None:
            out = out + self.bias  # (B, L, D)
        return out.transpose(1, 2).reshape(B, -1, H // p, W // p)  # (B, D, H/p, W/p), as the convolution


def _is_patch_conv(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == module.stride
        and module.kernel_size[0] == module.kernel_size[1]
        and module.padding == (0, 0)
        and module.dilation == (1, 1)
        and module.groups == 1
    )


def explicit_attention_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (the stateless template ``functional_call`` runs) rewritten for ``vmap``:
    timm's attention computes softmax(q k^T / sqrt(d)) explicitly (torch has no ``vmap`` rule for the
    fused CPU kernel and would fall back to a Python loop over the sites), and patch-embedding
    convolutions become :class:`_PatchLinear`. Same maths and parameter names, other float rounding."""
    clone = copy.deepcopy(model)
    for module in list(clone.modules()):
        if hasattr(module, "fused_attn"):
            setattr(module, "fused_attn", False)  # noqa: B010  (timm's attention flag; setattr keeps mypy quiet)
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and _is_patch_conv(child):
                setattr(module, name, _PatchLinear(child))
    return clone


class _SitePool:
    """All clients' training examples in one set of tensors, so a chunk's batches are one gather."""

    def __init__(self, clients: dict[int, CohortDataset]) -> None:
        sites = sorted(clients)
        self.offset, start = {}, 0
        for site in sites:
            self.offset[site] = start
            start += len(clients[site])
        self.images = torch.cat([clients[s].images for s in sites])  # (N, M, H, W)
        self.modality_mask = torch.cat([clients[s].modality_mask for s in sites])  # (N, M)
        self.clinical = torch.cat([clients[s].clinical for s in sites])  # (N, K)
        self.labels = torch.cat([clients[s].labels for s in sites])  # (N,)

    def gather(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Inputs and labels for global row indices ``index`` (S, B)."""
        return tuple(
            t[index].to(device, non_blocking=True)
            for t in (self.images, self.modality_mask, self.clinical, self.labels)
        )


@dataclass
class _Plan:
    """One chunk: its sites and, per local step, the sites that have that step (``rows``, positions in
    the chunk; None = all), their (S_s, B_s) global example indices and weights (0 = padding)."""

    sites: list[int]
    rows: list[torch.Tensor | None]  # per step (S_s,) long
    index: list[torch.Tensor]  # per step (S_s, B_s) long
    weight: list[torch.Tensor]  # per step (S_s, B_s) float, 1 = real example, 0 = padding
    steps: torch.Tensor  # (S,) steps per site


def _plan_chunk(sites: list[int], batches: dict[int, list[torch.Tensor]], offset: dict[int, int]) -> _Plan:
    num_steps = max(len(batches[s]) for s in sites)
    rows, index, weight = [], [], []
    for step in range(num_steps):
        active = [i for i, s in enumerate(sites) if step < len(batches[s])]
        parts = [batches[sites[i]][step] + offset[sites[i]] for i in active]
        idx = nn.utils.rnn.pad_sequence(parts, batch_first=True, padding_value=-1)  # (S_s, B_s), one C++ call
        real = idx >= 0
        # padding repeats a real row of the site (finite inputs) with weight 0
        index.append(torch.where(real, idx, idx[:, :1]))
        weight.append(real.to(torch.get_default_dtype()))
        rows.append(None if len(active) == len(sites) else torch.tensor(active))
    steps = torch.tensor([len(batches[s]) for s in sites])
    return _Plan(sites=sites, rows=rows, index=index, weight=weight, steps=steps)


def plan_chunks(
    order: list[int],
    batches: dict[int, list[torch.Tensor]],
    chunk_size: int,
    *,
    max_padding: float = 1.3,
    min_sites: int = 8,
) -> list[list[int]]:
    """Cut sites (sorted by schedule) into chunks of at most ``chunk_size``; a chunk also ends where
    the next site's first batch is more than ``max_padding`` times the chunk's first (once it holds
    ``min_sites``), so padding wastes at most ~30% of a chunk's compute."""
    chunks: list[list[int]] = []
    for site in order:
        if chunks:
            chunk = chunks[-1]
            first = len(batches[chunk[0]][0])
            if len(chunk) < chunk_size and (len(chunk) < min_sites or len(batches[site][0]) <= max_padding * first):
                chunk.append(site)
                continue
        chunks.append([site])
    return chunks


class _ParamView:
    """Stands in for the model inside ``vmap``: ``named_parameters()`` yields one site's parameters,
    so a strategy's regulariser (FedProx's proximal term) runs unchanged on stacked parameters."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self._params = params

    def named_parameters(self):
        return iter(self._params.items())

    def parameters(self):
        return iter(self._params.values())


class _StackedOptimizer:
    """torch's SGD (momentum, weight decay; ``dampening=0``, no Nesterov) and AdamW on (S, *shape)
    tensors, one row per site; a step updates only the rows of the sites that have it.

    Written out because ``torch.optim`` updates whole tensors; the formulas are torch's own
    (``torch.optim.SGD`` / ``torch.optim.AdamW`` defaults: betas (0.9, 0.999), eps 1e-8), so a site's
    row follows the trajectory its own optimiser would. A site's k-th step is the chunk's k-th step
    (schedules are prefixes), so one step counter serves every row.
    """

    def __init__(self, config: OptimizerConfig, params: dict[str, torch.Tensor]) -> None:
        self.config, self.step_count = config, 0
        self.state: dict[str, list[torch.Tensor]] = {}
        if config.name == "adamw":
            self.state = {n: [torch.zeros_like(p), torch.zeros_like(p)] for n, p in params.items()}
        elif config.momentum:  # torch's first step sets buf = grad: with zeros, buf * m + grad is the same
            self.state = {n: [torch.zeros_like(p)] for n, p in params.items()}

    @staticmethod
    def first_step(
        config: OptimizerConfig, start: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], *, keep_state: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """The first step from fresh state, in closed form: the update ``theta_1 - theta_0`` (S, *shape)
        and, if ``keep_state``, the optimiser state after it. ``start`` rows may be unbatched (*shape):
        a start every site shares, broadcast, never copied per site.

        AdamW from zero state: m_1 = (1 - b1) g, v_1 = (1 - b2) g^2, so the bias-corrected step is
        m_1 / (1 - b1) / (sqrt(v_1 / (1 - b2)) + eps) = g / (|g| + eps), and
        ``theta_1 - theta_0 = -lr wd theta_0 - lr g / (|g| + eps)`` (torch's AdamW, decoupled weight
        decay). SGD: ``d = g + wd theta_0`` (the momentum buffer after step 1), ``theta_1 - theta_0 =
        -lr d``. Equal to :meth:`step` from zero state up to float rounding (one division instead of
        a square root of a square), and 2-4 elementwise passes instead of ~10.
        """
        delta: dict[str, torch.Tensor] = {}
        state: dict[str, list[torch.Tensor]] = {}
        lr, wd = config.lr, config.weight_decay
        for name, g in grads.items():
            p0 = start[name]
            if config.name == "adamw":
                denom = g.abs().add_(1e-8)
                if wd:  # -lr wd theta_0 (broadcast over the site axis when shared) - lr g / denom, in one pass
                    d = torch.addcdiv(p0 * (-lr * wd), g, denom, value=-lr)
                else:
                    d = torch.div(g, denom, out=denom).mul_(-lr)
                if keep_state:
                    state[name] = [g * 0.1, g * g * 0.001]  # (1 - b1) g, (1 - b2) g^2
            else:
                step = g + wd * p0 if wd else g
                d = step * -lr
                if keep_state and config.momentum:
                    state[name] = [step if step is not g else g.clone()]
            delta[name] = d
        return delta, state

    def step(
        self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], rows: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """New parameters; ``grads`` hold the rows ``rows`` only (None: every row)."""
        cfg = self.config
        self.step_count += 1

        def take(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t.index_select(0, rows)

        def put(full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
            return part if rows is None else full.index_copy(0, rows, part)

        if cfg.name == "adamw" and hasattr(torch, "_fused_adamw_"):
            return self._fused_adamw(params, grads, rows)
        out = {}
        for name, full in params.items():
            p, g = take(full), grads[name]
            if cfg.name == "adamw":
                beta1, beta2, eps = 0.9, 0.999, 1e-8
                exp_avg, exp_avg_sq = self.state[name]
                avg = take(exp_avg).lerp(g, 1 - beta1)
                sq = take(exp_avg_sq) * beta2 + (1 - beta2) * g * g
                bias1 = 1 - beta1**self.step_count
                bias2_sqrt = math.sqrt(1 - beta2**self.step_count)
                denom = sq.sqrt() / bias2_sqrt + eps
                new_p = p * (1 - cfg.lr * cfg.weight_decay) - (cfg.lr / bias1) * avg / denom
                self.state[name] = [put(exp_avg, avg), put(exp_avg_sq, sq)]
            else:
                d_p = g + cfg.weight_decay * p if cfg.weight_decay else g
                if cfg.momentum:
                    buf = take(self.state[name][0]) * cfg.momentum + d_p
                    self.state[name] = [put(self.state[name][0], buf)]
                    d_p = buf
                new_p = p - cfg.lr * d_p
            out[name] = put(full, new_p)
        return out

    def _fused_adamw(
        self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], rows: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """AdamW through torch's fused kernel (what ``torch.optim.AdamW(fused=True)`` runs: one pass per
        tensor instead of ~10 elementwise passes, which cost ~0.2 s a step for 1,000 sites). In place
        on ``params`` (the caller owns them) and the state; a subset of rows is stepped on copies."""
        cfg, names = self.config, list(params)
        steps = [torch.tensor(float(self.step_count), device=params[names[0]].device) for _ in names]
        if rows is None:
            ps = [params[n] for n in names]
            avgs, sqs = [self.state[n][0] for n in names], [self.state[n][1] for n in names]
        else:
            ps = [params[n].index_select(0, rows) for n in names]
            avgs = [self.state[n][0].index_select(0, rows) for n in names]
            sqs = [self.state[n][1].index_select(0, rows) for n in names]
        torch._fused_adamw_(
            ps,
            [grads[n] for n in names],
            avgs,
            sqs,
            [],
            steps,
            lr=cfg.lr,
            beta1=0.9,
            beta2=0.999,
            weight_decay=cfg.weight_decay,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        )
        if rows is not None:
            for n, p, avg, sq in zip(names, ps, avgs, sqs, strict=False):
                params[n].index_copy_(0, rows, p)
                self.state[n][0].index_copy_(0, rows, avg)
                self.state[n][1].index_copy_(0, rows, sq)
        return params


def train_stacked(
    model: nn.Module,
    start: dict[str, torch.Tensor],
    plan: _Plan,
    pool: _SitePool,
    *,
    training: LocalTrainingConfig,
    optimizer: OptimizerConfig,
    device: torch.device,
    regulariser: Callable[[Any], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Local training of a chunk of S sites at once; returns each site's update ``theta_T - theta_0``
    (S, *shape) and mean training loss over its steps (as :func:`~.client.local_update` reports them).

    ``start`` holds per parameter either the S sites' start rows (S, *shape) or one tensor of the
    parameter's own shape that every site of the chunk starts from (the broadcast global model of
    FedAvg and DP-FedAvg, MM-PFL-ADP's shared part).

    Per step and site k: ``L_k = sum_i w_ki CE(f(theta_k, x_ki), y_ki) / sum_i w_ki`` (+ the
    regulariser), the gradient by ``vmap(grad(L))`` over the site axis, optional per-site gradient
    clipping to ``max_grad_norm`` (``torch.nn.utils.clip_grad_norm_``'s rule), then one optimiser step.
    Sites without a k-th step are left out of step k (not computed, not updated).

    Step 1 is special: shared start parameters enter ``vmap`` unbatched (``in_dims=None``), so the
    forward pass and the input gradients are single large matrix products over all the chunk's
    examples, as in centralised training, and only the weight-gradient reductions are per site
    (batched products over each site's examples); the optimiser's first step is taken in closed
    form on the gradients (:meth:`_StackedOptimizer.first_step`), writing the update directly. With
    one step per site (the regime map: ~8 training subjects, batch 16) that is the whole round.
    """
    buffers = {n: b.to(device) for n, b in model.named_buffers()}

    def site_loss(params, images, mask, clinical, labels, weights):
        logits = functional_call(model, (params, buffers), (images, mask, clinical))  # (B, classes)
        per_example = F.cross_entropy(logits, labels, reduction="none")  # (B,)
        loss = (per_example * weights).sum() / weights.sum()
        if regulariser is not None:
            loss = loss + regulariser(_ParamView(params))
        return loss, loss.detach()

    shapes = dict(model.named_parameters())
    shared = {n for n, t in start.items() if t.dim() == shapes[n].dim()}
    start = {n: t.to(device) for n, t in start.items()}
    num_sites = len(plan.sites)

    def clip(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if training.max_grad_norm is None:
            return grads
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()  # (S_s,)
        coef = (training.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        return {n: g * coef.view(-1, *([1] * (g.dim() - 1))) for n, g in grads.items()}

    total_loss = torch.zeros(num_sites, device=device)
    was_training = model.training
    model.train()
    try:
        steps = list(zip(plan.rows, plan.index, plan.weight, strict=False))
        rows, index, weight = steps[0]
        if rows is not None:
            raise ValueError("every site of a chunk takes the first step (sites without batches are left out)")
        in_dims = ({n: None if n in shared else 0 for n in start}, 0, 0, 0, 0, 0)
        images, mask, clinical, labels = pool.gather(index, device)  # (S, B, ...) each
        grads, losses = vmap(grad(site_loss, has_aux=True), in_dims=in_dims)(
            start, images, mask, clinical, labels, weight.to(device)
        )
        total_loss += losses
        more = len(steps) > 1
        delta, state = _StackedOptimizer.first_step(optimizer, start, clip(grads), keep_state=more)
        if not more:
            return delta, total_loss / plan.steps.to(device)
        params = {n: delta[n] + start[n] for n in start}  # (S, *shape)
        opt = _StackedOptimizer(optimizer, params)
        opt.step_count, opt.state = 1, state or opt.state
        step_grad = vmap(grad(site_loss, has_aux=True))
        for rows, index, weight in steps[1:]:
            rows = None if rows is None else rows.to(device)
            images, mask, clinical, labels = pool.gather(index, device)  # (S_s, B_s, ...) each
            active = params if rows is None else {n: p.index_select(0, rows) for n, p in params.items()}
            grads, losses = step_grad(active, images, mask, clinical, labels, weight.to(device))
            params = opt.step(params, clip(grads), rows)
            total_loss = total_loss + losses if rows is None else total_loss.index_add(0, rows, losses)
    finally:
        model.train(was_training)
    return {n: params[n] - start[n] for n in start}, total_loss / plan.steps.to(device)


def _bytes_per_example(model: nn.Module, pool: _SitePool, device: torch.device) -> int:
    """Bytes autograd saves for one example's forward pass (measured once with a saved-tensor hook)."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    images, mask, clinical, _ = pool.gather(torch.zeros(1, dtype=torch.long), device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images, mask, clinical).sum()
    return saved[0]


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA's free memory, or MemAvailable of /proc/meminfo (4 GiB if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def auto_chunk_size(
    model: nn.Module, pool: _SitePool, training: LocalTrainingConfig, device: torch.device, *, fraction: float = 0.25
) -> int:
    """Sites per chunk so that one chunk uses at most ``fraction`` of free memory (capped at
    :data:`MAX_AUTO_CHUNK`, :data:`MAX_AUTO_CHUNK_CUDA` on a GPU). Per site: parameters, gradient,
    start copy and two optimiser states (6 d floats) plus the activations of a batch (saved bytes per example x batch size x 3, for the
    backward pass and vmap's temporaries)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    per_site = 6 * params + 3 * training.batch_size * _bytes_per_example(model, pool, device)
    cap = MAX_AUTO_CHUNK_CUDA if device.type == "cuda" else MAX_AUTO_CHUNK
    return int(max(1, min(cap, fraction * available_memory_bytes(device) // per_site)))


def clipped_sum(
    deltas: dict[str, torch.Tensor], groups: dict[str, list[str]], clip_bounds: dict[str, float]
) -> tuple[dict[str, torch.Tensor], bool]:
    """sum_k clip(Delta_k) over the S stacked updates (S, *shape), clipped per group as
    :func:`~mmpfl_core.privacy.clipping.clip_per_group` clips one update: ||Delta_kg|| in float64,
    scale_kg = min(1, C_g / ||Delta_kg||), then the scaled updates summed. Returns the sum and whether
    every update was finite (if not, the caller must use the strategy's own per-site path, which
    rejects and logs the bad update). The per-site norms never leave this function."""
    index = {n: g for g, names in groups.items() for n in names}
    sq = {g: 0.0 for g in groups}
    for name, d in deltas.items():
        norm = torch.linalg.vector_norm(d.flatten(1), dim=1, dtype=torch.float64)  # (S,), float64 accumulation
        sq[index[name]] = sq[index[name]] + norm * norm
    scales: dict[str, torch.Tensor] = {}
    finite = True
    for g, value in sq.items():
        if not torch.is_tensor(value):
            continue
        norm = value.sqrt()
        finite = finite and bool(torch.isfinite(norm).all())
        bound = float(clip_bounds[g])
        scales[g] = torch.where(norm <= bound, torch.ones_like(norm), bound / norm)  # (S,)
    total = {n: torch.tensordot(scales[index[n]].to(d.dtype), d, dims=1) for n, d in deltas.items()}
    return total, finite


class VectorizedSimulation(FederatedSimulation):
    """:class:`~.simulation.FederatedSimulation` with the sites of a round trained together (module
    docstring). Construction refuses what the engine cannot reproduce (``check_vectorizable``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_vectorizable(self.strategy, self.model)
        self.pool = _SitePool(self.clients)
        self.train_model = explicit_attention_copy(self.model)
        self.chunk_size = self.config.chunk_size or auto_chunk_size(
            self.train_model, self.pool, self.config.local, self.device
        )
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        # after_local needs each site's trained model only where the strategy overrides it
        self._needs_trained_model = type(self.strategy).after_local is not Strategy.after_local
        self._stacked_release = _releases_a_clipped_sum(self.strategy)
        self._stacked_mean = _releases_a_weighted_mean(self.strategy)
        # what aggregate() releases instead of the per-site path: ("clipped-sum" | "weighted-sum", sum, count)
        self._pending: tuple[str, dict[str, torch.Tensor], int] | None = None
        self._param_dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}
        self._proxies: dict[frozenset[str], list[torch.Tensor]] = {}

    def _regulariser(self, sites: list[int]) -> Callable[[Any], torch.Tensor] | None:
        """The strategy's local regulariser, which must be the same for every site of the round."""
        regs = [self.strategy.regulariser(site, self.global_state) for site in sites[:1]]
        if regs[0] is not None and self.strategy.name != "fedprox":
            raise ConfigError(
                f"engine='vectorized' cannot run the per-site regulariser of {self.strategy.name!r}; "
                "use federated.engine: loop (--engine loop)."
            )
        return regs[0]

    def _stack_starts(self, sites: list[int]) -> dict[str, torch.Tensor]:
        """Per parameter, the sites' start rows (S, *shape), or the one tensor (*shape) they all start
        from (the broadcast global model): :func:`train_stacked` keeps that one unbatched."""
        starts = [self.strategy.client_start_state(site, self.global_state) for site in sites]
        # one start dict for all (FedAvg, DP-FedAvg): no per-parameter check over a thousand sites
        same = all(s is starts[0] for s in starts)
        out = {}
        for name in self.trainable:
            first = starts[0][name]
            if same or all(s[name] is first for s in starts):  # everybody starts from the global model
                out[name] = first.detach().to(self.device)
            else:
                out[name] = torch.stack([s[name].detach().to(self.device) for s in starts])  # (S, *shape)
        return out

    def _expand(self, start: dict[str, torch.Tensor], num_sites: int) -> dict[str, torch.Tensor]:
        """``start`` with shared entries broadcast to (S, *shape) (views, no copy)."""
        shapes = dict(self.model.named_parameters())
        return {n: t.expand(num_sites, *t.shape) if t.dim() == shapes[n].dim() else t for n, t in start.items()}

    def train_clients(self, selected: list[int], t: int) -> tuple[list[ClientUpdate], list[State]]:
        if not selected:
            return [], []
        cfg = self.config
        for site in selected[:1]:  # the strategy decides per site; it is None for every strategy served
            if self.strategy.private_training(site, len(self.clients[site])) is not None:
                raise ConfigError("engine='vectorized' does not run sample-level DP-SGD; use federated.engine: loop.")
        batches = {
            s: site_batches(len(self.clients[s]), cfg.local, seed=cfg.seed, round_index=t, site_id=s) for s in selected
        }
        # similar schedules side by side: little padding inside a chunk
        # a site without training examples takes no step: its update is zero, as in local_update
        order = sorted(
            (s for s in selected if batches[s]), key=lambda s: (len(batches[s]), [len(b) for b in batches[s]])
        )
        regulariser = self._regulariser(selected)
        deltas: dict[int, dict[str, torch.Tensor]] = {}
        trained_rows: dict[int, dict[str, torch.Tensor]] = {}
        losses: dict[int, float] = {}
        stacked = self._stacked_release  # stays True while every update is finite
        total: dict[str, torch.Tensor] = {}
        weighted: dict[str, torch.Tensor] = {}
        for sites in plan_chunks(order, batches, self.chunk_size):
            plan = _plan_chunk(sites, batches, self.pool.offset)
            start = self._stack_starts(sites)
            delta, loss = train_stacked(
                self.train_model,
                start,
                plan,
                self.pool,
                training=cfg.local,
                optimizer=cfg.optimizer,
                device=self.device,
                regulariser=regulariser,
            )
            if stacked:
                dp = cast(
                    "DPFedAvg", self.strategy
                )  # stacked only for DPFedAvg's own release (_releases_a_clipped_sum)
                part, finite = clipped_sum(delta, dp.groups, dp.clip_bounds)
                stacked = finite  # a NaN/Inf update: the strategy's per-site path rejects and logs it
                total = {n: total[n] + v if n in total else v for n, v in part.items()}
            if self._stacked_mean:  # sum_k n_k Delta_k, the numerator of the strategy's weighted mean
                n_k = torch.tensor([float(len(self.clients[s])) for s in sites], device=self.device)
                for n in self.trainable:
                    part_n = torch.tensordot(n_k.to(delta[n].dtype), delta[n], dims=1)
                    weighted[n] = weighted[n] + part_n if n in weighted else part_n
            delta_rows = _stacked_rows(delta, len(sites))
            trained_by_site = None
            if self._needs_trained_model:
                begin = self._expand(start, len(sites))
                trained_by_site = _stacked_rows({n: begin[n] + delta[n] for n in self.trainable}, len(sites))
            for row, (site, value) in enumerate(zip(sites, loss.tolist(), strict=False)):
                deltas[site], losses[site] = delta_rows[row], value
                if trained_by_site is not None:
                    trained_rows[site] = trained_by_site[row]
        for site in (s for s in selected if not batches[s]):
            start = self._expand(self._stack_starts([site]), 1)
            deltas[site], losses[site] = (
                _stacked_rows({n: torch.zeros_like(start[n]) for n in self.trainable}, 1)[0],
                0.0,
            )
            if self._needs_trained_model:
                trained_rows[site] = _stacked_rows(start, 1)[0]
        updates, sent = [], []
        for site in selected:  # the release, site by site, in the loop engine's order and through its hooks
            update = ClientUpdate(
                site_id=site,
                delta=deltas.pop(site),
                num_examples=len(self.clients[site]),
                num_steps=len(batches[site]),
                train_loss=losses[site],
            )
            if self._needs_trained_model:
                self.model.load_state_dict(trained_rows.pop(site), strict=False)
                self.strategy.after_local(site, self.model)
            # the stacked release transmits clip(delta): the same names, shapes and bytes as the delta
            transmitted = update.delta if stacked else self.strategy.transmit(update, t)
            self.count_traffic(t, site, transmitted)
            updates.append(update)
            sent.append(transmitted)
        self._pending = None
        if stacked:
            self._pending = ("clipped-sum", total, len(selected))
        elif self._stacked_mean and weighted:
            self._pending = ("weighted-sum", weighted, sum(len(self.clients[s]) for s in selected))
        return updates, sent

    def count_traffic(self, t: int, site: int, transmitted: State) -> None:
        """As the loop engine, but a state holding model parameters only is charged through a one-tensor
        stand-in per dtype on the meta device (same numel, same dtype, no memory): the bytes of a state
        depend only on which parameters it holds, and counting 28 tensors per site twice cost more than
        a thousand sites' clipping."""
        if not self.strategy.communicates:
            return
        down = self.strategy.broadcast(site, self.global_state)
        self.counter.add_download(t, site, self._byte_proxy(down))
        self.counter.add_upload(t, site, self._byte_proxy(transmitted))

    def _byte_proxy(self, state: State) -> State | list[torch.Tensor]:
        key = frozenset(state)
        if key not in self._proxies:
            if not key <= self._param_dtypes.keys() or any(state[n].dtype != self._param_dtypes[n] for n in key):
                return state  # something else than the model's parameters as they are: count it as it is
            numel: dict[torch.dtype, int] = {}
            for n in key:
                numel[state[n].dtype] = numel.get(state[n].dtype, 0) + state[n].numel()
            self._proxies[key] = [torch.empty(k, dtype=d, device="meta") for d, k in numel.items()]
        return self._proxies[key]

    def aggregate(self, updates: list[ClientUpdate], sent: list[State], t: int) -> State:
        """The strategy's ``aggregate``; for the stacked clip-and-sum release, its ``release_sum`` of
        the clipped sum (server noise, fixed denominator qN, ledger), as after a secure sum; for a
        weighted mean (:func:`_releases_a_weighted_mean`), its ``aggregate`` of one pre-reduced update
        ``sum_k n_k Delta_k / sum_k n_k`` with weight ``sum_k n_k`` (the mean is linear in the updates)."""
        if self._pending is None:
            return super().aggregate(updates, sent, t)
        (kind, total, count), self._pending = self._pending, None
        if kind == "clipped-sum":
            return cast("DPFedAvg", self.strategy).release_sum(self.global_state, total, count, t)
        if count <= 0:  # no site holds an example: the strategy's mean keeps the global model
            return super().aggregate(updates, sent, t)
        mean = {n: v / count for n, v in total.items()}
        pooled = ClientUpdate(site_id=-1, delta=mean, num_examples=count, num_steps=0, train_loss=0.0)
        return self.strategy.aggregate(self.global_state, [pooled], [mean], t)


ENGINES["vectorized"] = VectorizedSimulation
