"""Personalised strategies: FedPer, FedRep, Ditto, FedAvg + fine-tuning, FedAvg + dynamic KL masks.

All are hooks on the one round loop (:mod:`.simulation`). A *partial-sharing* strategy keeps some
parameter groups personal at each site: personal groups are never transmitted (``transmit`` drops
them, ``broadcast`` does not send them, so the byte counters show the saving) and never overwritten
by the global model (``client_start_state`` merges global shared + the site's personal tensors).

Parameter groups come from the model in ``configure`` (``model.parameter_groups()``); strategies
that train a second model (FedRep's phases, Ditto's personal model, fine-tuning) use the run's local
training and optimiser configs and seed unless given their own, and draw randomness from
``(seed, stream, round, site)`` with torch's global RNG forked, so runs stay reproducible and
resumable. Personal models are outside the client-level
DP guarantee (docs/DESIGN.md 4.6): only sample-level DP protects the patients of a deployed personal model.
"""

from __future__ import annotations

import copy
from typing import Any, cast
from collections.abc import Mapping, Sequence, Set

import numpy as np
import torch
from torch import nn

from ..data.contract import CohortDataset
from ..data.federation import Federation
from ..errors import ConfigError
from ..models.layers import GroupedModel
from ..personalization.masks import DynamicKLMasks, MaskSchedule
from ..personalization.release import ScoreRelease
from ..privacy.dp_sgd import PrivateTraining, SampleLevelDP
from ..seeding import Stream, torch_generator
from .client import ClientUpdate, LossRegulariser, local_update, steps_per_round, trainable_state
from .config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from .sample_level import SampleLevelHooks
from .strategies import State, Strategy, proximal_term, register_strategy, weighted_average_update

__all__ = [
    "Ditto",
    "DittoDPSGD",
    "FedAvgFineTune",
    "FedAvgKLMasks",
    "FedPer",
    "FedRep",
    "PartialSharingStrategy",
    "PublicModelOnly",
]


def _as_config(value, cls):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**value)
    raise ConfigError(f"expected {cls.__name__} or a dict, got {type(value).__name__}.")


class _SecondModelTrainer:
    """Training of a scratch copy of the model outside the loop's own local update (reproducibly)."""

    def _init_trainer(self, training, optimizer, seed: int | None) -> None:
        # Explicit arguments win; otherwise configure() takes the run's own configs and seed.
        self._explicit = (training, optimizer, seed)
        self.training: LocalTrainingConfig = _as_config(training, LocalTrainingConfig)
        self.optimizer: OptimizerConfig = _as_config(optimizer, OptimizerConfig)
        self.seed = 0 if seed is None else int(seed)
        self._scratch: nn.Module | None = None

    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)  # type: ignore[misc]  # a mixin: the next class in the MRO is a Strategy
        training, optimizer, seed = self._explicit
        self.training = config.local if training is None else self.training
        self.optimizer = config.optimizer if optimizer is None else self.optimizer
        self.seed = config.seed if seed is None else self.seed

    def _scratch_model(self, model: nn.Module) -> nn.Module:
        if self._scratch is None:  # one copy per run, not per group/site/round
            self._scratch = copy.deepcopy(model)
        return self._scratch

    def _train(
        self,
        model: nn.Module,
        dataset: CohortDataset,
        *,
        stream: int,
        round_index: int,
        site: int,
        training: LocalTrainingConfig | None = None,
        frozen: Set[str] = frozenset(),
        regulariser: LossRegulariser | None = None,
        private_training: PrivateTraining | None = None,
    ) -> ClientUpdate:
        """``local_update`` on ``model`` with the parameters in ``frozen`` held fixed (with DP-SGD when
        ``private_training`` is given: :func:`~mmpfl_core.federated.client.local_update`)."""
        device = next(model.parameters()).device
        generator = torch_generator(self.seed, stream, round_index, site)
        params = dict(model.named_parameters())
        flags = {n: p.requires_grad for n, p in params.items()}
        try:
            for n in frozen:
                params[n].requires_grad_(False)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                return local_update(
                    model,
                    dataset,
                    site_id=site,
                    training=training or self.training,
                    optimizer=self.optimizer,
                    generator=generator,
                    device=device,
                    regulariser=regulariser,
                    private_training=private_training,
                )
        finally:
            for n, flag in flags.items():
                params[n].requires_grad_(flag)


class PartialSharingStrategy(Strategy):
    """FedAvg where each site keeps some parameter groups personal (see the module docstring).

    Subclasses define :meth:`personal_groups` (and may override :meth:`_after_training`).
    ``self.personal[site]`` holds exactly the site's personal tensors (checkpointed by the base).
    """

    def __init__(self) -> None:
        super().__init__()
        self.param_groups: dict[str, list[str]] | None = None
        self.group_sizes: dict[str, int] = {}
        self.train_sets: dict[int, CohortDataset] = {}
        self.val_sets: dict[int, CohortDataset] = {}
        self._round = 0
        self._round_global: State | None = None
        self._start_groups: dict[int, frozenset[str]] = {}

    # ---- what is personal
    def personal_groups(self, site_id: int) -> frozenset[str]:
        raise NotImplementedError

    def _names(self, groups) -> set[str]:
        if self.param_groups is None:
            return set()
        return {n for g in groups for n in self.param_groups[g]}

    def personal_names(self, site_id: int) -> set[str]:
        return self._names(self.personal_groups(site_id))

    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)
        grouped = cast(GroupedModel, model)  # ViT and CNN alike (models.layers.GroupedModel)
        self.param_groups = grouped.parameter_groups()
        self.group_sizes = grouped.group_sizes()
        self._check_groups(self.param_groups)

    def _check_groups(self, groups: Mapping[str, Sequence[str]]) -> None:
        """Hook: validate configured group names against the model's."""

    # ---- hooks
    def client_datasets(self, federation: Federation) -> dict[int, CohortDataset]:
        self.train_sets = {s.site_id: CohortDataset(s.train) for s in federation.sites}
        self.val_sets = {s.site_id: CohortDataset(s.val) for s in federation.sites}
        return dict(self.train_sets)

    def before_round(self, round_index: int) -> None:
        self._round = round_index

    def client_start_state(self, site_id: int, global_state: State) -> State:
        self._round_global = global_state
        # The mask at the start of the round decides what was downloaded (broadcast is counted later).
        self._start_groups[site_id] = self.personal_groups(site_id)
        own = self.personal.get(site_id, {})
        return {**global_state, **{n: own[n] for n in self.personal_names(site_id) if n in own}}

    def broadcast(self, site_id: int, global_state: State) -> State:
        skip = self._names(self._start_groups.get(site_id, self.personal_groups(site_id)))
        return {n: t for n, t in global_state.items() if n not in skip}

    def after_local(self, site_id: int, model: nn.Module) -> None:
        self._after_training(site_id, model)
        names = self.personal_names(site_id)
        params = dict(model.named_parameters())
        if names:
            self.personal[site_id] = {n: params[n].detach().clone() for n in sorted(names)}
        else:
            self.personal.pop(site_id, None)

    def _after_training(self, site_id: int, model: nn.Module) -> None:
        """Hook: site-side work after local training, before the personal tensors are stored."""

    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        skip = self.personal_names(update.site_id)
        return {n: d for n, d in update.delta.items() if n not in skip}

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        own = self.personal.get(site_id)
        return None if not own else {**global_state, **own}


@register_strategy("fedper")
class FedPer(PartialSharingStrategy):
    """FedPer (Arivazhagan et al. 2019): ``personal_groups`` (default the head) stay local, the body is averaged.

    With ``personal_groups=()`` it is FedAvg exactly. The global model's head is never updated
    (nobody sends it): its global metrics are those of the averaged body with the initial head.
    """

    def __init__(self, personal_groups: Sequence[str] = ("head",)) -> None:
        super().__init__()
        if isinstance(personal_groups, str):
            personal_groups = (personal_groups,)
        self.fixed_personal = frozenset(personal_groups)

    def _check_groups(self, groups: Mapping[str, Sequence[str]]) -> None:
        unknown = self.fixed_personal - set(groups)
        if unknown:
            raise ConfigError(
                f"personal_groups {sorted(unknown)} are not parameter groups of the model; available: {list(groups)}."
            )

    def personal_groups(self, site_id: int) -> frozenset[str]:
        return self.fixed_personal


@register_strategy("fedrep")
class FedRep(_SecondModelTrainer, FedPer):
    """FedRep (Collins et al. 2021): per round, train the head with the body frozen for ``head_epochs``,
    then the body with the head frozen for ``body_epochs``; upload the body only.

    Implementation (the loop has no hook for alternating phases): the loop's joint local update is
    discarded; ``after_local`` re-runs the round from the same start state on a scratch copy with the
    two phases (exact FedRep), and ``transmit`` sends that body delta. Cost: one wasted joint pass per
    client and round (about (local_epochs + head_epochs + body_epochs) / (head_epochs + body_epochs)
    times FedRep's own compute). A ``Strategy.local_train`` hook would remove the waste (see report).
    """

    def __init__(
        self,
        personal_groups: Sequence[str] = ("head",),
        *,
        head_epochs: int = 1,
        body_epochs: int = 1,
        training: LocalTrainingConfig | dict | None = None,
        optimizer: OptimizerConfig | dict | None = None,
        seed: int | None = None,
    ) -> None:
        FedPer.__init__(self, personal_groups)
        if int(head_epochs) < 1 or int(body_epochs) < 1:
            raise ConfigError(f"fedrep head_epochs={head_epochs!r} and body_epochs={body_epochs!r} must be >= 1.")
        self._init_trainer(training, optimizer, seed)
        self.head_epochs, self.body_epochs = int(head_epochs), int(body_epochs)
        self._start: dict[int, State] = {}
        self._body_delta: dict[int, State] = {}

    def client_start_state(self, site_id: int, global_state: State) -> State:
        start = super().client_start_state(site_id, global_state)
        self._start[site_id] = start
        return start

    def _after_training(self, site_id: int, model: nn.Module) -> None:
        scratch = self._scratch_model(model)
        start = self._start.pop(site_id)
        scratch.load_state_dict(start, strict=False)
        head = self.personal_names(site_id)
        body = {n for n, p in scratch.named_parameters() if p.requires_grad} - head

        def phase(epochs: int) -> LocalTrainingConfig:
            return LocalTrainingConfig(
                local_epochs=epochs, batch_size=self.training.batch_size, max_grad_norm=self.training.max_grad_norm
            )

        self._train(
            scratch,
            self.train_sets[site_id],
            stream=Stream.FEDREP,
            round_index=self._round,
            site=site_id * 2,
            training=phase(self.head_epochs),
            frozen=body,
        )
        self._train(
            scratch,
            self.train_sets[site_id],
            stream=Stream.FEDREP,
            round_index=self._round,
            site=site_id * 2 + 1,
            training=phase(self.body_epochs),
            frozen=head,
        )
        trained = trainable_state(scratch)
        self._body_delta[site_id] = {n: trained[n] - start[n] for n in body}
        model.load_state_dict(trained, strict=False)  # the site's model is the FedRep-trained one

    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        return self._body_delta.pop(update.site_id)


@register_strategy("ditto")
class Ditto(_SecondModelTrainer, SampleLevelHooks):
    """Ditto (Li et al. 2021): FedAvg for the global model w; each site also trains a personal model v
    on its data with (lambda/2)||v - w||^2 added to the loss, w being the global model of the round.

    The loop trains one model per client, so the personal update runs in ``after_local`` on a scratch
    copy with the run's local training config (the same number of steps as the global update): Ditto
    costs twice FedAvg's local compute. v starts from the global model at a site's first round and
    is the site's deployed model (``personal_state``), evaluated on its own test split.

    Patient-level DP (``sample_level_dp``: kwargs of :class:`~mmpfl_core.privacy.dp_sgd.SampleLevelDP`;
    ``ditto-dp-sgd`` requires it). Unit: one patient of one site (add/remove-one-patient adjacency).
    In a round a participating site k runs two DP-SGD trainings on its patients, each T_r steps of the
    subsampled Gaussian mechanism (Poisson rate q_k = B / n_k, per-sample clip C, noise z C):

        1. the global update w -> w_k (the loop's local update), whose delta w_k - w is released;
        2. the personal update v_k -> v_k', pulled towards w by (lambda/2)||v - w||^2. w is the
           released global model (public) and v_k is itself a DP-SGD output, so the pull's gradient
           is added after the clipping and the noise (post-processing, as MR-MTL's).

    Everything the site releases (its deltas) and deploys (v_k) is post-processing of the noisy
    gradients of both trainings, so its guarantee is the composition of all 2 T_r steps of every
    round it took part in: the site's ledger records both (entries of the same (z, q_k)), and a
    ``target_epsilon`` is calibrated for 2 x steps_per_round x num_rounds steps, so a site that takes
    part in every round stays within it. The server averages the deltas UNIFORMLY (weighting by n_k
    would release n_k, which changes with one patient).
    """

    def __init__(
        self,
        lam: float = 0.1,
        *,
        training: LocalTrainingConfig | dict | None = None,
        optimizer: OptimizerConfig | dict | None = None,
        seed: int | None = None,
        sample_level_dp: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not lam >= 0:
            raise ConfigError(f"ditto lam={lam!r} must be >= 0 (0: purely local personal models).")
        self.lam = float(lam)
        self._init_trainer(training, optimizer, seed)
        self.sample_dp = None if sample_level_dp is None else SampleLevelDP(**sample_level_dp)
        # secure DP-SGD (default): batches and noise from the OS CSPRNG, never from the run seed
        self.secret_randomness = self.sample_dp is not None and self.sample_dp.noise == "secure"
        self.train_sets: dict[int, CohortDataset] = {}
        self._round = 0
        self._round_global: State | None = None

    #: DP-SGD trainings per participation: the global update and the personal one (class docstring).
    TRAININGS_PER_ROUND = 2

    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)
        self._configure_sample_level(config)

    def private_training(self, site_id: int, num_examples: int) -> PrivateTraining | None:
        """DP-SGD settings of site ``site_id``, calibrated for both trainings of every round."""
        if self.sample_dp is None:
            return None
        training = self.sample_dp.training_for(
            site_id,
            num_examples=num_examples,
            batch_size=self._local.batch_size,
            steps_per_round=self.TRAININGS_PER_ROUND * steps_per_round(num_examples, self._local),
            num_rounds=self._num_rounds,
        )
        self._site_training[site_id] = training
        return training

    def client_datasets(self, federation: Federation) -> dict[int, CohortDataset]:
        self.train_sets = super().client_datasets(federation)
        return dict(self.train_sets)

    def before_round(self, round_index: int) -> None:
        self._round = round_index

    def client_start_state(self, site_id: int, global_state: State) -> State:
        self._round_global = global_state
        return global_state

    def after_local(self, site_id: int, model: nn.Module) -> None:
        scratch = self._scratch_model(model)
        assert self._round_global is not None  # set by client_start_state() before the site trains
        anchor = {n: t.detach() for n, t in self._round_global.items()}
        scratch.load_state_dict(self.personal.get(site_id, anchor), strict=False)
        private = None if self.sample_dp is None else self._site_training[site_id]
        personal = self._train(
            scratch,
            self.train_sets[site_id],
            stream=Stream.DITTO,
            round_index=self._round,
            site=site_id,
            regulariser=proximal_term(anchor, self.lam) if self.lam > 0 else None,
            private_training=private,
        )
        if self.sample_dp is not None and private is not None:
            # charged before the personal model is stored (and so before it can be deployed or queried)
            self.sample_dp.record(site_id, private, personal.num_steps, self._round)
        self.personal[site_id] = trainable_state(scratch)

    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        self._record_sample_level(update, round_index)  # the global update's DP-SGD steps
        return update.delta

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State], round_index: int
    ) -> State:
        if self.sample_dp is None:
            return super().aggregate(global_state, updates, sent, round_index)
        return weighted_average_update(global_state, sent, [1.0] * len(sent))  # uniform: n_k is private

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        return self.personal.get(site_id)

    def round_report(self, round_index: int) -> dict[str, float]:
        return self._sample_report()

    def summary_report(self) -> dict[str, Any]:
        return self._sample_summary()

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, state = super().state_dict()
        if self.sample_dp is None:  # Ditto without DP checkpoints exactly as before
            return tensors, state
        return tensors, {**state, "sample_dp": self.sample_dp.state_dict()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        super().load_state_dict(tensors, state)
        if self.sample_dp is not None:
            self.sample_dp.load_state_dict(state["sample_dp"])


@register_strategy("ditto-dp-sgd")
class DittoDPSGD(Ditto):
    """Ditto with DP-SGD inside every site (:class:`Ditto`'s patient-level section): ``sample_level_dp``
    (``target_epsilon`` or ``noise_multiplier``, ``max_grad_norm``, ``delta``, ``noise``) is required."""

    def __init__(self, lam: float = 0.1, *, sample_level_dp: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if sample_level_dp is None:
            raise ConfigError(
                "ditto-dp-sgd needs sample_level_dp (e.g. {target_epsilon: 8, max_grad_norm: 1.0}); "
                "for Ditto without DP use the 'ditto' method."
            )
        super().__init__(lam, sample_level_dp=sample_level_dp, **kwargs)


@register_strategy("public-model-only")
class PublicModelOnly(Strategy):
    """The public pretrained model, deployed at every site as it is: no site trains, nothing is sent.

    The floor every private method must clear (docs/DESIGN.md 4.7): what public data alone gives. No site's
    data is used (no site is ever selected, so no local update runs), so its patients are protected
    perfectly by construction (epsilon 0 for every unit, and d = 0 private parameters); the sites'
    test splits only score it. Meaningful only on top of public pretraining (the experiment's
    ``pretraining:`` section, which :func:`mmpfl_core.experiment.compare_methods` requires for it);
    without it this is the untrained model.
    """

    communicates = False
    #: Read by the experiment's tables: this method trains no parameter on any site's data.
    trains_on_site_data = False

    def select(self, client_ids: Sequence[int], config: FederatedConfig, rng: np.random.Generator) -> list[int]:
        return []

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State], round_index: int
    ) -> State:
        return global_state


@register_strategy("fedavg-ft")
class FedAvgFineTune(_SecondModelTrainer, Strategy):
    """FedAvg, and each site deploys the global model fine-tuned on its own training data for
    ``finetune_epochs`` (a common strong personalisation baseline).

    The fine-tuned models are computed lazily when an evaluation asks for them, once per round and
    site, from the round's global model and a stream ``(seed, 33, round, site)``; they are not
    checkpointed (a resumed run recomputes the same ones). Cost: finetune_epochs passes per site per
    evaluated round (set ``eval_every`` to keep it cheap).
    """

    def __init__(
        self,
        finetune_epochs: int = 1,
        *,
        training: LocalTrainingConfig | dict | None = None,
        optimizer: OptimizerConfig | dict | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if int(finetune_epochs) < 1:
            raise ConfigError(f"fedavg-ft finetune_epochs={finetune_epochs!r} must be >= 1.")
        self.finetune_epochs = int(finetune_epochs)
        self._init_trainer(training, optimizer, seed)
        self.train_sets: dict[int, CohortDataset] = {}
        self._round = 0
        self._cache: dict[int, State] = {}
        self._cache_key: tuple[int, int] | None = None

    def client_datasets(self, federation: Federation) -> dict[int, CohortDataset]:
        self.train_sets = super().client_datasets(federation)
        return dict(self.train_sets)

    def before_round(self, round_index: int) -> None:
        self._round = round_index

    def after_local(self, site_id: int, model: nn.Module) -> None:
        self._scratch_model(model)

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        if self._scratch is None or site_id not in self.train_sets:
            return None
        key = (self._round, id(global_state))
        if key != self._cache_key:
            self._cache, self._cache_key = {}, key
        if site_id not in self._cache:
            self._scratch.load_state_dict(global_state, strict=False)
            config = LocalTrainingConfig(
                local_epochs=self.finetune_epochs,
                batch_size=self.training.batch_size,
                max_grad_norm=self.training.max_grad_norm,
            )
            self._train(
                self._scratch,
                self.train_sets[site_id],
                stream=Stream.FINETUNE,
                round_index=self._round,
                site=site_id,
                training=config,
            )
            self._cache[site_id] = trainable_state(self._scratch)
        return self._cache[site_id]


@register_strategy("fedavg-kl-masks")
class FedAvgKLMasks(PartialSharingStrategy):
    """Non-private FedAvg with dynamic KL-divergence personalisation masks (the masks of MM-PFL-ADP).

    After local training, a due site scores every group on its validation split
    (:func:`~mmpfl_core.personalization.kl_scores.kl_group_scores`, global model vs. global with that
    group replaced by the site's trained one), updates its mask (:class:`MaskSchedule`, with
    hysteresis), keeps its personal groups and uploads only the shared ones. A group that turns
    personal in a round is already withheld in that round's upload.

    Privacy: no DP here, and exact scores are used unless ``score_clip`` is set (then scores go
    through ``release_scores`` with ``score_noise_multiplier``; account for it with
    ``mask_release_multiplier`` jointly with the update release, docs/DESIGN.md 4.4).

    Args: ``schedule`` keys of :class:`MaskSchedule` (``mode``, ``threshold``, ``top_fraction``,
    ``update_every``, ``hysteresis``, ...), plus ``score_batch_size`` and ``seed``.
    """

    def __init__(
        self,
        *,
        score_batch_size: int = 256,
        score_clip: float | None = None,
        score_noise_multiplier: float = 1.0,
        seed: int | None = None,
        **schedule: Any,
    ) -> None:
        super().__init__()
        release = None if score_clip is None else ScoreRelease(clip=score_clip, noise_multiplier=score_noise_multiplier)
        self.masker = DynamicKLMasks(
            MaskSchedule(**schedule),
            release=release,
            score_batch_size=score_batch_size,
            seed=0 if seed is None else seed,
        )
        self._explicit_seed = seed
        self._participants: list[int] = []

    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)
        self.masker.seed = config.seed if self._explicit_seed is None else int(self._explicit_seed)

    def _check_groups(self, groups: Mapping[str, Sequence[str]]) -> None:
        self.masker.set_param_groups(groups, self.group_sizes)

    def personal_groups(self, site_id: int) -> frozenset[str]:
        return self.masker.personal_groups(site_id)

    def before_round(self, round_index: int) -> None:
        super().before_round(round_index)
        self._participants = []

    def _after_training(self, site_id: int, model: nn.Module) -> None:
        self._participants.append(site_id)
        trained = {n: p.detach() for n, p in model.named_parameters()}
        assert self._round_global is not None  # set by client_start_state() before the site trains
        self.masker.maybe_update(site_id, self._round, model, self._round_global, trained, self.val_sets[site_id])

    def round_report(self, round_index: int) -> dict[str, float]:
        sites = sorted(self.train_sets)
        return {
            "personal_fraction": self.masker.personal_fraction(sites),
            "mask_changes": float(self.masker.masks.changes_in(round_index)),
        }

    def summary_report(self) -> dict[str, Any]:
        masks = self.masker.masks
        return {
            "masks": {str(s): sorted(masks.personal_groups(s)) for s in sorted(self.train_sets)},
            "mask_score_release": "exact scores (no server to hide them from in this non-private strategy)"
            if self.masker.release is None
            else f"Gaussian release, clip={self.masker.release.clip}, z={self.masker.release.noise_multiplier}",
        }

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, state = super().state_dict()
        return tensors, {**state, "masker": self.masker.state_dict()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        super().load_state_dict(tensors, state)
        self.masker.load_state_dict(state["masker"])
