"""Split a cohort across simulated institutions: label skew, quantity skew, scanners, splits.

What it is for: turning one synthetic population into a federation whose sites differ the way
hospitals do: different case mixes (Dirichlet label skew), different sizes (quantity skew),
different scanners (:mod:`mmpfl_core.data.scanners`), and sometimes a missing sequence. A small
public set is held out *before* site assignment and imaged with the reference scanner; it belongs
to no site and is what the server may use (e.g. Fisher estimation, docs/DESIGN.md 4.3).

What it must never do: let one subject appear in two sites or two splits, or let the public set
overlap any site (tests check both).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import ConfigError, check_range
from ..seeding import numpy_generator
from .contract import MODALITIES, Cohort, concatenate
from .scanners import ScannerProfile, apply_scanner, default_site_profiles, reference_profile
from .synthetic import SyntheticCohortConfig, generate_subjects


@dataclass(frozen=True)
class FederationConfig:
    """How the population is split into sites and splits."""

    num_sites: int = 5
    alpha: float = 0.5  # Dirichlet label skew; smaller = more skewed, float("inf") = IID labels
    quantity_skew: float = 0.5  # std of log site size; 0 = equal sizes
    val_fraction: float = 0.15  # per site, stratified by class
    test_fraction: float = 0.2  # per site; the union of site test splits is the global test set
    min_subjects_per_site: int = 10  # every site gets at least this many (and >= 1 per split)
    public_size: int = 100  # server-side public subjects, held out before site assignment; 0 = none
    missing_modality_sites: tuple[tuple[int, str], ...] = ((1, "T2"),)  # (site, sequence) gaps; site 1 is a 1.5 T site
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("num_sites", self.num_sites, low=1, high=100_000)  # engine: vectorized runs 10^4 sites a round
        check_range(
            "alpha",
            self.alpha,
            low=0.0,
            low_inclusive=False,
            fix="Use a small value (0.1) for strong label skew, float('inf') for IID sites.",
        )
        check_range("quantity_skew", self.quantity_skew, low=0.0)
        check_range("val_fraction", self.val_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_range("test_fraction", self.test_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction!r} "
                "must be < 1 so that every site keeps training data."
            )
        check_range(
            "min_subjects_per_site",
            self.min_subjects_per_site,
            low=3,
            fix="Each site needs at least one subject per split (train, val, test).",
        )
        check_range("public_size", self.public_size, low=0)
        pairs = tuple((int(s), str(m)) for s, m in self.missing_modality_sites)
        for site, mod in pairs:
            if site < 0 or mod not in MODALITIES:
                raise ConfigError(
                    f"missing_modality_sites entry {(site, mod)!r} needs a site index >= 0 "
                    f"and a sequence in {MODALITIES}."
                )
        object.__setattr__(self, "missing_modality_sites", pairs)


@dataclass(frozen=True)
class SiteData:
    """One institution: its scanner and its private train/val/test cohorts (``sites`` = site_id)."""

    site_id: int
    name: str
    profile: ScannerProfile
    train: Cohort
    val: Cohort
    test: Cohort

    def __len__(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)


@dataclass(frozen=True)
class Federation:
    """Sites, the global test population (union of site tests) and the optional public set."""

    sites: tuple[SiteData, ...]
    global_test: Cohort
    public: Cohort | None
    cohort_config: SyntheticCohortConfig | None
    federation_config: FederationConfig

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def label_distribution(self) -> np.ndarray:
        """Class counts of each site's train split, shape (num_sites, num_classes)."""
        return np.stack([s.train.class_counts() for s in self.sites])

    def site_sizes(self) -> np.ndarray:
        """Subjects per site over all three splits, shape (num_sites,)."""
        return np.array([len(s) for s in self.sites], dtype=np.int64)


def dirichlet_label_partition(
    labels: np.ndarray,
    num_sites: int,
    alpha: float,
    quantity_skew: float,
    rng: np.random.Generator,
    min_per_site: int = 1,
) -> list[np.ndarray]:
    """Split positions ``0..len(labels)-1`` into ``num_sites`` disjoint, covering index arrays.

    Algorithm (per-class Dirichlet, Hsu et al. 2019, with quantity skew):

    1. Site weights ``w = softmax(quantity_skew * z)``, ``z ~ N(0, 1)`` (equal if quantity_skew=0).
    2. For each class c, site shares ``q_c ~ Dirichlet(alpha * K * w)`` (mean ``w``; with equal
       weights this is the classic ``Dirichlet(alpha * 1)``); ``alpha = inf`` gives ``q_c = w``.
    3. Counts ``n_c * q_c`` rounded by largest remainder, so each class is split exactly.
    4. Rebalance: while a site has fewer than ``min_per_site``, move one subject from the largest
       site (of that site's most frequent class) to it.
    5. Draw which subjects of class c go where by a random permutation.

    Returns:
        ``num_sites`` sorted int64 arrays of positions; lower ``alpha`` gives site label
        distributions further from the pooled one.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if n < num_sites * min_per_site:
        raise ConfigError(
            f"cannot give {num_sites} sites at least {min_per_site} subjects each from {n} "
            "subjects; raise num_subjects or lower num_sites / min_subjects_per_site."
        )
    classes = np.unique(labels)
    z = rng.standard_normal(num_sites)
    w = np.exp(quantity_skew * (z - z.max()))
    w /= w.sum()
    counts = np.zeros((classes.size, num_sites), dtype=np.int64)  # (C, K)
    for i, c in enumerate(classes):
        n_c = int(np.sum(labels == c))
        if np.isinf(alpha):
            q = w
        else:
            q = rng.dirichlet(np.maximum(alpha * num_sites * w, 1e-8))
            if not np.all(np.isfinite(q)) or q.sum() <= 0:  # tiny concentrations can underflow
                q = np.eye(num_sites)[rng.integers(num_sites)]
        counts[i] = _largest_remainder(n_c, q)
    totals = counts.sum(axis=0)
    while totals.min() < min_per_site:
        receiver, donor = int(np.argmin(totals)), int(np.argmax(totals))
        c = int(np.argmax(counts[:, donor]))
        counts[c, donor] -= 1
        counts[c, receiver] += 1
        totals[donor] -= 1
        totals[receiver] += 1
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for i, c in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        for k, chunk in enumerate(np.split(members, np.cumsum(counts[i])[:-1])):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def _largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
    """Integers proportional to ``shares`` that sum exactly to ``total``."""
    raw = total * shares / shares.sum()
    out = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    return out


def _stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of train/val/test, stratified by label, each split non-empty (needs >= 3 items).

    Each item's key is (rank within its class + U(0,1)) / class size; sorting by it interleaves the
    classes in proportion, so any prefix (the test set, then val) is stratified.
    """
    n = labels.shape[0]
    key = np.empty(n)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        key[members] = (rng.permutation(members.size) + rng.random(members.size)) / members.size
    order = np.argsort(key, kind="stable")
    n_test = min(max(1, round(n * test_fraction)), n - 2)
    n_val = min(max(1, round(n * val_fraction)), n - n_test - 1)
    test, val, train = np.split(order, [n_test, n_test + n_val])
    return np.sort(train), np.sort(val), np.sort(test)


def _public_indices(labels: np.ndarray, size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """About ``size / num_classes`` subjects per class (topped up from others when a class is short)."""
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    quota = _largest_remainder(size, np.ones(num_classes))
    take = [p[:q] for p, q in zip(per_class, quota, strict=True)]
    short = size - sum(t.size for t in take)
    if short > 0:
        rest = rng.permutation(np.concatenate([p[q:] for p, q in zip(per_class, quota, strict=True)]))
        take.append(rest[:short])
    return np.sort(np.concatenate(take)).astype(np.int64)


def build_federation(cohort_config: SyntheticCohortConfig, federation_config: FederationConfig) -> Federation:
    """Generate the synthetic population and split it into a :class:`Federation`.

    Steps: (1) :func:`generate_subjects`; (2) hold out the public set (class-balanced, reference
    scanner, ``sites`` = -1); (3) :func:`dirichlet_label_partition` of the rest; (4) each site's
    scanner applied to all its subjects; (5) stratified train/val/test per site.
    """
    fc = federation_config
    n = cohort_config.num_subjects
    if n - fc.public_size < fc.num_sites * fc.min_subjects_per_site:
        raise ConfigError(
            f"num_subjects={n} leaves {n - fc.public_size} after public_size={fc.public_size}, "
            f"fewer than num_sites * min_subjects_per_site = "
            f"{fc.num_sites * fc.min_subjects_per_site}; raise num_subjects or lower the others."
        )
    subjects = generate_subjects(cohort_config)
    assert isinstance(subjects, Cohort)  # return_tissue_maps=False: the cohort alone
    rng = numpy_generator(fc.seed, 1)
    public_idx = _public_indices(subjects.labels, fc.public_size, subjects.num_classes, rng)
    rest = np.setdiff1d(np.arange(n), public_idx)
    parts = dirichlet_label_partition(
        subjects.labels[rest], fc.num_sites, fc.alpha, fc.quantity_skew, rng, fc.min_subjects_per_site
    )
    profiles = default_site_profiles(fc.num_sites, fc.seed, missing_modalities=fc.missing_modality_sites)
    sites = []
    for k, (part, profile) in enumerate(zip(parts, profiles, strict=True)):
        cohort = acquire_cohort(subjects.subset(rest[part]), profile, numpy_generator(fc.seed, 2, k), site=k)
        train, val, test = _stratified_split(
            cohort.labels, fc.val_fraction, fc.test_fraction, numpy_generator(fc.seed, 3, k)
        )
        sites.append(
            SiteData(
                site_id=k,
                name=profile.name,
                profile=profile,
                train=cohort.subset(train),
                val=cohort.subset(val),
                test=cohort.subset(test),
            )
        )
    public = None
    if fc.public_size > 0:
        public = acquire_cohort(subjects.subset(public_idx), reference_profile(), numpy_generator(fc.seed, 4), site=-1)
    return Federation(
        sites=tuple(sites),
        global_test=concatenate([s.test for s in sites]),
        public=public,
        cohort_config=cohort_config,
        federation_config=fc,
    )


def acquire_cohort(cohort: Cohort, profile: ScannerProfile, rng: np.random.Generator, site: int) -> Cohort:
    """The cohort as acquired by ``profile``, labelled with ``site``."""
    images, mask = apply_scanner(cohort.images, profile, rng, modality_names=cohort.modality_names)
    return replace(cohort, images=images, modality_mask=mask, sites=np.full(len(cohort), site, dtype=np.int64))


def label_divergence(federation: Federation) -> float:
    """Mean Jensen-Shannon divergence (nats, in [0, ln 2]) of the sites' train label distributions
    from the pooled train distribution. 0 means every site has the pooled case mix."""
    return label_divergence_from_counts(federation.label_distribution())


def label_divergence_from_counts(counts: np.ndarray) -> float:
    """:func:`label_divergence` of a (num_sites, num_classes) count matrix."""
    counts = np.asarray(counts, dtype=np.float64)  # (K, C)
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    pooled = counts.sum(axis=0) / counts.sum()
    mid = 0.5 * (p + pooled[None])

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log(a / b), 0.0).sum(axis=1)

    return float(np.mean(0.5 * kl(p, mid) + 0.5 * kl(np.broadcast_to(pooled, p.shape), mid)))
