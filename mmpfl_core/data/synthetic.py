"""The embedded synthetic multi-modal MS cohort: 2D axial brain slices with clinical variables.

What it is for: a small, realistic-looking, fully reproducible stand-in for a multiple-sclerosis
(MS) imaging cohort, so that every notebook and test runs without downloading patient data.
:func:`generate_subjects` draws site-less subjects with *clean tissue intensities*; scanner effects
(field strength, bias field, Rician noise, vendor scale, missing sequences) are added per site by
:mod:`mmpfl_core.data.scanners`. What it must never do: read real patient data, or use global RNGs.

Realism rules (textbook radiology; see ``docs/FACTS.md`` "MRI and MS facts"; e.g. Atlas, *Magnetic
Resonance Imaging of the Brain and Spine*; Filippi et al., *Lancet Neurol* 2016 on MS MRI criteria).
Relative tissue brightness, highest first, and the values used here (before scanner effects):

=========  =======================================  ============================================
sequence   ordering                                 values (CSF / GM / WM / lesion / skull-fat)
=========  =======================================  ============================================
T1         fat > WM > GM > CSF; lesions iso- (=WM)  0.12 / 0.50 / 0.75 / 0.30..0.75 / 0.92
           to hypointense ("black holes", down
           to 0.30, below GM)
T2         CSF > lesion > GM > WM                   0.95 / 0.55 / 0.40 / 0.82 / 0.60
FLAIR      lesion > GM > WM > CSF (CSF suppressed;  0.08 / 0.50 / 0.38 / 0.90 / 0.55
           lesions most conspicuous, esp. next to
           the dark ventricles)
=========  =======================================  ============================================

Anatomy per subject: skull/scalp ring (fat, bright on T1), extra-axial CSF, a brain ellipse with a
wavy cortical grey-matter band, white matter, and two lateral ventricles (a "butterfly"); random
size, eccentricity, rotation and position. Atrophy (a latent 0..1) shrinks the brain inside the
skull, enlarges the ventricles and thins the cortex.

Classes (:data:`~mmpfl_core.data.contract.CLASS_NAMES`):

* ``healthy``: a few small, round, non-specific white-matter hyperintensities, more with age
  (a real source of overlap with MS); atrophy grows slowly with age.
* ``rrms``: ovoid lesions, mostly periventricular and oriented perpendicular to the ventricle wall
  ("Dawson's fingers"), some juxtacortical and deep; mild atrophy; age 20-45, about 3:1 female.
* ``progressive_ms``: higher lesion load, more T1 black holes, marked atrophy, older, about 1:1.

Knobs and the clinical fact each stands for (:class:`SyntheticCohortConfig`; site and scanner knobs
live in :mod:`mmpfl_core.data.scanners` and :mod:`mmpfl_core.data.federation`):

=====================  =========================================================================
knob                   clinical fact it stands for
=====================  =========================================================================
``num_subjects``       size of a multi-centre MS imaging study (hundreds to a few thousand)
``image_size``         in-plane resolution of one axial slice (64 px ~ 3.5 mm, 32 px ~ 7 mm pixels:
                       small lesions blur into one or two pixels, as in thick low-resolution slices)
``class_proportions``  case mix of an MS clinic cohort: controls, relapsing-remitting MS (most MS
                       patients at diagnosis), progressive MS (about 15% at onset, more later)
``difficulty``         how much the classes overlap in reality: spread of lesion load within a
                       class, healthy white-matter hyperintensities with age and migraine, atrophy
                       variance between people, and EDSS rater noise and relapse fluctuation
``lesion_contrast``    lesion conspicuity of the recruiting hospitals' protocol: the fraction of the
                       lesion-vs-white-matter contrast kept in every sequence (1 = the reference
                       values above; 0.5 = half as conspicuous, as with 1.5 T or thick slices, which
                       detect fewer and fainter lesions than 3 T). A domain knob: the public cohort
                       (:mod:`mmpfl_core.pretraining`) keeps 1, so hospitals with another value
                       share an appearance the public data lacks
``seed``               which patients were recruited (every draw derives from it)
=====================  =========================================================================

Fixed class-conditional facts (in :func:`_draw_latents`): median lesion count 5 (RRMS) and 9
(progressive), T1 "black hole" fraction 0.3 and 0.6, atrophy latent 0.08 / 0.16 / 0.30 rising with
age, RRMS about 3:1 female with onset 20-45, progressive about 1:1 and older, EDSS about 2.4 vs 4.6.

What the images carry at the default settings (measured for notebook 01, quickstart cohort, 32 px,
910 training subjects, balanced accuracy on 280 held-out subjects, 10 epochs, 3 seeds): hybrid ViT on
the three sequences 0.66 (seeds 0.71 / 0.56 / 0.70), small ResNet 0.61, FLAIR alone 0.64 and 0.68 for
two seeds (a third stayed at chance), clinical variables alone 0.66, images fused with clinical
0.80; chance is 0.33. At 64 px a linear probe (tests/test_synthetic.py) gives FLAIR 0.58, images
0.62, clinical 0.65, fused 0.68: learnable, far from trivial, fused above either source.

``difficulty`` in [0, 1] widens every class-conditional distribution (lesion load, atrophy, clinical
noise, healthy white-matter hyperintensities), so classes overlap more. At the default 0.5, neither
images nor clinical variables alone separate the classes well; fused they do better. Measured with a
3-fold logistic regression on 3,000 subjects at 64 px after five site scanners: clinical only 68%,
image features (16x16 FLAIR + lesion/CSF statistics) 68%, both 78% (chance: 40%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from ..errors import ConfigError, check_range
from ..seeding import numpy_generator
from .contract import CLASS_NAMES, CLINICAL_FEATURES, MODALITIES, Cohort, standardise_clinical

#: Integer codes of :func:`generate_subjects`'s ``tissue_maps`` (N, H, W) int8.
TISSUE_LABELS: dict[str, int] = {"background": 0, "skull": 1, "csf": 2, "ventricle": 3, "gm": 4, "wm": 5, "lesion": 6}

# Tissue intensities per sequence (rows: T1, T2, FLAIR), columns ordered as TISSUE_LABELS.
# The lesion column is the fully-lesioned value; T1 lesions blend between WM (iso) and _T1_BLACK_HOLE.
_TISSUE_VALUES = np.array(
    [
        # bg    skull  csf   vent  gm    wm    lesion
        [0.00, 0.92, 0.12, 0.12, 0.50, 0.75, 0.75],  # T1
        [0.00, 0.60, 0.95, 0.95, 0.55, 0.40, 0.82],  # T2
        [0.00, 0.55, 0.08, 0.08, 0.50, 0.38, 0.90],  # FLAIR
    ],
    dtype=np.float32,
)
_T1_BLACK_HOLE = 0.30
_MAX_LESIONS = 40
_BLOCK = 128  # subjects rendered together


@dataclass(frozen=True)
class SyntheticCohortConfig:
    """Configuration of the synthetic cohort (defaults give the full teaching cohort)."""

    num_subjects: int = 3000  # 300 is plenty for smoke tests
    image_size: int = 64  # pixels per side; 32 for smoke runs, up to 224 for ViT-sized inputs
    difficulty: float = 0.5  # 0 = well separated classes, 1 = heavy overlap
    class_proportions: tuple[float, ...] = (0.4, 0.35, 0.25)  # healthy, rrms, progressive_ms
    seed: int = 0
    lesion_contrast: float = 1.0  # fraction of the lesion-vs-white-matter contrast kept (module docstring)

    def __post_init__(self) -> None:
        check_range("num_subjects", self.num_subjects, low=1, fix="Ask for at least one subject (300 for a smoke run).")
        check_range(
            "image_size", self.image_size, low=16, high=256, fix="Use 32 for smoke runs, 64 by default, at most 256."
        )
        check_range("difficulty", self.difficulty, low=0.0, high=1.0)
        check_range(
            "lesion_contrast",
            self.lesion_contrast,
            low=0.0,
            high=2.0,
            low_inclusive=False,
            fix="1 keeps the reference lesion contrast; 0.5 halves it (a fainter-lesion protocol).",
        )
        props = tuple(float(p) for p in self.class_proportions)
        if len(props) != len(CLASS_NAMES) or min(props) < 0 or abs(sum(props) - 1.0) > 1e-6:
            raise ConfigError(
                f"class_proportions={self.class_proportions!r} must be {len(CLASS_NAMES)} "
                f"non-negative numbers summing to 1, one per class {CLASS_NAMES}."
            )
        object.__setattr__(self, "class_proportions", props)


def generate_subjects(
    config: SyntheticCohortConfig, *, return_tissue_maps: bool = False
) -> Cohort | tuple[Cohort, np.ndarray]:
    """Draw ``config.num_subjects`` site-less subjects with clean tissue intensities.

    Steps: (1) labels from ``class_proportions``; (2) clinical variables and latent lesion load /
    atrophy per class; (3) anatomy label maps on an (N, H, W) grid; (4) lesions, rendered one
    lesion slot at a time for all subjects that have one; (5) intensities per sequence from
    :data:`_TISSUE_VALUES`, light partial-volume blur, clip to [0, 1].

    Args:
        config: the cohort configuration; the same config gives bit-identical arrays.
        return_tissue_maps: also return the (N, H, W) int8 tissue label map (codes in
            :data:`TISSUE_LABELS`), e.g. to test contrasts per tissue.

    Returns:
        A :class:`Cohort` with ``sites`` = -1, all sequences present, ``lesion_masks`` filled and
        ``meta`` holding the config; with ``return_tissue_maps`` a ``(cohort, tissue_maps)`` pair.
    """
    rng = numpy_generator(config.seed, 0)
    n, size, d = config.num_subjects, config.image_size, config.difficulty
    labels = rng.choice(len(CLASS_NAMES), size=n, p=config.class_proportions).astype(np.int64)
    clinical_raw, lesion_count, atrophy, black_hole = _draw_latents(labels, d, rng)
    subj = _draw_anatomy(n, atrophy, rng)
    lesions = _draw_lesions(labels, lesion_count, black_hole, d, subj, rng)
    # Per-subject biological variation of tissue intensity (a few percent), shared by sequences.
    jitter = 1.0 + 0.03 * rng.standard_normal((n, 1, len(TISSUE_LABELS))).astype(np.float32)
    values = _TISSUE_VALUES[None] * jitter  # (N, M, T)

    images = np.empty((n, len(MODALITIES), size, size), dtype=np.float32)
    lesion_masks = np.empty((n, size, size), dtype=bool)
    tissue = np.empty((n, size, size), dtype=np.int8)
    # Blocks of subjects keep the (B, H, W) temporaries cache-sized; results do not depend on it.
    for lo in range(0, n, _BLOCK):
        hi = min(lo + _BLOCK, n)
        images[lo:hi], lesion_masks[lo:hi], tissue[lo:hi] = _render_block(
            lo, hi, subj, lesions, values, size, config.lesion_contrast
        )

    clinical, clinical_mask = standardise_clinical(clinical_raw, CLINICAL_FEATURES)
    cohort = Cohort(
        images=images,
        modality_mask=np.ones((n, len(MODALITIES)), dtype=bool),
        clinical=clinical,
        clinical_mask=clinical_mask,
        labels=labels,
        sites=np.full(n, -1, dtype=np.int64),
        subject_ids=np.array([f"syn-{i:06d}" for i in range(n)]),
        lesion_masks=lesion_masks,
        meta={"source": "synthetic", "cohort_config": asdict(config)},
    )
    return (cohort, tissue) if return_tissue_maps else cohort


def _render_block(
    lo: int,
    hi: int,
    subj: dict[str, np.ndarray],
    lesions: dict[str, np.ndarray],
    values: np.ndarray,
    size: int,
    lesion_contrast: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (B, M, H, W), lesion masks (B, H, W) and tissue maps (B, H, W) of subjects lo..hi-1."""
    b = hi - lo
    block = {k: v[lo:hi] for k, v in subj.items()}
    tissue, ub, vb = _anatomy_maps(block, size)
    occ, occ_t1 = _render_lesions(lesions, lo, hi, ub, vb)
    # Lesions live in white matter (and reach into the cortex when juxtacortical), never in CSF.
    allowed = (tissue == TISSUE_LABELS["wm"]) | (tissue == TISSUE_LABELS["gm"])
    occ *= allowed
    occ_t1 *= allowed
    lesion_mask = occ > 0.5
    base = np.take_along_axis(values[lo:hi], tissue.reshape(b, 1, -1).astype(np.intp), axis=2)  # (B, M, H*W)
    base = base.reshape(b, len(MODALITIES), size, size)  # (B, M, H, W)
    lesion_val = values[lo:hi, :, TISSUE_LABELS["lesion"], None, None].copy()  # (B, M, 1, 1)
    lesion_val[:, 0] = _T1_BLACK_HOLE  # T1: only "black hole" lesions darken; others stay isointense
    if lesion_contrast != 1.0:  # skipped at 1 so the reference cohort stays bit-identical
        wm = values[lo:hi, :, TISSUE_LABELS["wm"], None, None]  # (B, M, 1, 1)
        lesion_val = wm + np.float32(lesion_contrast) * (lesion_val - wm)
    occ_m = np.stack([occ_t1, occ, occ], axis=1)  # (B, M, H, W) in MODALITIES order
    images = base * (1.0 - occ_m) + lesion_val * occ_m
    sigma_pv = 0.5 * size / 64.0  # partial-volume blur, the same physical extent at every size
    images = gaussian_filter(images, sigma=(0, 0, sigma_pv, sigma_pv), mode="constant")
    tissue[lesion_mask] = TISSUE_LABELS["lesion"]
    return np.clip(images, 0.0, 1.0), lesion_mask, tissue


def _draw_latents(
    labels: np.ndarray, d: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clinical variables (N, 4) in raw units and the latents that drive the images.

    Returns ``(clinical_raw, lesion_count, atrophy, black_hole_fraction)``. A shared per-subject
    severity couples EDSS to lesion load and atrophy within a class, as in real cohorts, so the two
    views are correlated but each keeps information the other lacks.
    """
    n = labels.shape[0]
    healthy, rrms, prog = labels == 0, labels == 1, labels == 2
    severity = rng.standard_normal(n)

    age = np.empty(n)
    age[healthy] = rng.uniform(20, 75, healthy.sum())
    age[rrms] = np.clip(rng.normal(36, 9 + 6 * d, rrms.sum()), 18, 65)
    age[prog] = np.clip(rng.normal(48, 9 + 6 * d, prog.sum()), 25, 80)
    p_female = np.select([healthy, rrms], [0.5, 0.75], 0.5)
    sex_female = (rng.random(n) < p_female).astype(np.float64)

    noise = 1.6 + 3.0 * d  # clinical noise: EDSS is rater-dependent and fluctuates with relapses
    edss = (
        np.select([healthy, rrms], [0.3, 2.4], 4.6)
        + 0.6 * severity * (~healthy)
        + rng.normal(0, 1, n) * np.where(healthy, 0.4 + 0.6 * d, noise)
    )
    edss = np.round(np.clip(edss, 0, 9.5) * 2) / 2  # the Kurtzke scale moves in 0.5 steps
    symptom = np.clip(np.select([healthy, rrms], [2.2, 3.2], 3.8) + rng.normal(0, 1.8 + 1.8 * d, n), 0, 10)
    symptom[rng.random(n) < 0.03] = np.nan  # missing questionnaires exercise clinical_mask
    edss[rng.random(n) < 0.01] = np.nan
    clinical_raw = np.stack([age, sex_female, edss, symptom], axis=1)  # (N, K)

    spread = 0.35 + 0.75 * d
    median = np.select([rrms, prog], [5.0, 9.0], 0.0)
    ms_count = np.round(median * np.exp(spread * (0.6 * severity + 0.8 * rng.standard_normal(n))))
    # Healthy white-matter hyperintensities: more with age and with difficulty.
    age_factor = np.clip((age - 20) / 40, 0.1, 1.5)
    wmh_count = rng.poisson((0.3 + 3.0 * d) * age_factor)
    lesion_count = np.where(healthy, wmh_count, np.maximum(ms_count, 1)).astype(np.int64)
    lesion_count = np.minimum(lesion_count, _MAX_LESIONS)

    atrophy = (
        np.select([healthy, rrms], [0.08, 0.16], 0.30)
        + 0.08 * np.clip((age - 20) / 50, 0, 1.2)
        + 0.04 * severity * (~healthy)
        + rng.normal(0, 0.03 + 0.12 * d, n)
    )
    atrophy = np.clip(atrophy, 0.0, 1.0)
    black_hole = np.select([healthy, rrms], [0.0, 0.3], 0.6)
    return clinical_raw, lesion_count, atrophy, black_hole


def _draw_anatomy(n: int, atrophy: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-subject shape parameters (each (N,)) of head, brain, cortex and ventricles."""
    head_a = 0.80 * (1 + 0.04 * rng.standard_normal(n))  # left-right semi-axis, image units
    return {
        "cx": 0.02 * rng.standard_normal(n),
        "cy": 0.02 * rng.standard_normal(n),
        "theta": np.deg2rad(6.0) * rng.standard_normal(n),
        "head_a": head_a,
        "head_b": head_a * rng.uniform(1.08, 1.22, n),
        "wobble": 0.02 * rng.standard_normal((n, 2)),
        "wobble_phase": rng.uniform(0, 2 * np.pi, (n, 2)),
        "brain_scale": 0.86 * (1 - 0.12 * atrophy),  # brain shrinks inside a fixed skull
        "cortex": (0.16 - 0.07 * atrophy) * (1 + 0.05 * rng.standard_normal(n)),
        "gyri": rng.integers(9, 14, n).astype(np.float64),
        "gyri_phase": rng.uniform(0, 2 * np.pi, n),
        "vent_scale": (0.75 + 1.6 * atrophy) * (1 + 0.06 * rng.standard_normal(n)),
        "vent_angle": np.deg2rad(rng.uniform(6, 16, n)),
    }


def _ventricle_frame(subj: dict[str, np.ndarray], side: float, idx: np.ndarray | slice = slice(None)):
    """Centre (cu, cv), semi-axes (a, b) and angle of one lateral ventricle in brain units."""
    vs = subj["vent_scale"][idx]
    cu = side * (0.07 + 0.05 * vs)
    cv = np.full_like(vs, -0.05)
    # Negative tilt: frontal horns (top, anterior) near the midline, bodies diverging posteriorly.
    return cu, cv, 0.075 * vs, 0.36 * np.sqrt(vs), -side * subj["vent_angle"][idx]


def _anatomy_maps(subj: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue label maps (N, H, W) int8 and brain-normalised coordinates ub, vb (N, H, W)."""
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = lin[None, None, :], lin[:, None][None]  # (1, 1, W), (1, H, 1)
    p = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in subj.items()}
    c, s = np.cos(p["theta"])[:, None, None], np.sin(p["theta"])[:, None, None]
    dx, dy = x - p["cx"][:, None, None], y - p["cy"][:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy  # (N, H, W) subject-aligned coordinates
    hu, hv = u / p["head_a"][:, None, None], v / p["head_b"][:, None, None]
    phi = np.arctan2(hv, hu)
    wob = 1 + sum(
        p["wobble"][:, k, None, None] * np.cos((k + 2) * phi + p["wobble_phase"][:, k, None, None]) for k in range(2)
    )
    r_head = np.sqrt(hu**2 + hv**2) * wob
    bs = p["brain_scale"][:, None, None]
    ub, vb = hu / bs, hv / bs  # brain units: the brain is (roughly) the unit disc
    r_brain = r_head / bs
    folds = 1 + 0.35 * np.cos(p["gyri"][:, None, None] * phi + p["gyri_phase"][:, None, None])
    cortex_inner = 1 - p["cortex"][:, None, None] * folds

    tissue = np.zeros(u.shape, dtype=np.int8)
    tissue[r_head < 1.0] = TISSUE_LABELS["skull"]
    tissue[r_head < 0.88] = TISSUE_LABELS["csf"]
    tissue[r_brain < 1.0] = TISSUE_LABELS["gm"]
    tissue[r_brain < cortex_inner] = TISSUE_LABELS["wm"]
    for side in (-1.0, 1.0):
        cu, cv, a, b, ang = (q[:, None, None] for q in _ventricle_frame(p, side))
        du, dv = ub - cu, vb - cv
        ca, sa = np.cos(ang), np.sin(ang)
        inside = ((ca * du + sa * dv) / a) ** 2 + ((-sa * du + ca * dv) / b) ** 2 < 1
        tissue[inside & (r_brain < 0.8)] = TISSUE_LABELS["ventricle"]
    return tissue, ub, vb


def _draw_lesions(
    labels: np.ndarray,
    count: np.ndarray,
    black_hole: np.ndarray,
    d: float,
    subj: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Parameters of every lesion of every subject, each a (T,) array (T = total lesion count).

    ``owner`` is the lesion's subject and ``slot`` its rank within that subject; centres
    ``lu, lv``, semi-axes ``la, lb`` and angle ``ang`` are in brain units (brain ~ unit disc).
    """
    n = labels.shape[0]
    owner = np.repeat(np.arange(n), count)  # (T,) subject of each lesion
    total = owner.shape[0]
    slot = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    is_ms = labels[owner] > 0

    # Location type: 0 periventricular, 1 juxtacortical, 2 deep white matter.
    kind = np.where(is_ms, rng.choice(3, total, p=(0.55, 0.2, 0.25)), 2)
    # Healthy hyperintensities are small and round; harder cohorts make them a bit more lesion-like.
    la = np.where(is_ms, rng.uniform(0.07, 0.15, total), rng.uniform(0.04, 0.06 + 0.04 * d, total))
    lb = la * np.where(is_ms, rng.uniform(0.4, 0.65, total), rng.uniform(0.75, 1.0, total))
    weight = np.where(is_ms, rng.uniform(0.75, 1.0, total), rng.uniform(0.55, 0.85, total))
    dark = (rng.random(total) < black_hole[owner]) * rng.uniform(0.4, 1.0, total)

    # Periventricular: on a ventricle's wall, long axis along the wall normal (Dawson's finger).
    side = np.where(rng.random(total) < 0.5, -1.0, 1.0)
    cu, cv, va, vbb, vang = _ventricle_frame(subj, 1.0, owner)
    cu = cu * side
    vang = vang * side
    tau = rng.uniform(0, 2 * np.pi, total)
    nx, ny = np.cos(tau) / va, np.sin(tau) / vbb
    norm = np.hypot(nx, ny)
    nx, ny = nx / norm, ny / norm
    px, py = va * np.cos(tau) + nx * la * 0.9, vbb * np.sin(tau) + ny * la * 0.9
    ca, sa = np.cos(vang), np.sin(vang)
    pv_u, pv_v = cu + ca * px - sa * py, cv + sa * px + ca * py
    pv_ang = np.arctan2(ny, nx) + vang
    # Juxtacortical: just inside the cortical band, long axis tangential to it.
    psi = rng.uniform(0, 2 * np.pi, total)
    rj = 1 - subj["cortex"][owner] - 0.6 * lb
    # Deep white matter: anywhere between ventricles and cortex.
    rd = rng.uniform(0.35, 0.75, total)
    r = np.where(kind == 1, rj, rd)
    return {
        "owner": owner,
        "slot": slot,
        "la": la,
        "lb": lb,
        "weight": weight,
        "dark": dark,
        "lu": np.where(kind == 0, pv_u, r * np.cos(psi)),
        "lv": np.where(kind == 0, pv_v, r * np.sin(psi)),
        "ang": np.where(kind == 0, pv_ang, np.where(kind == 1, psi + np.pi / 2, rng.uniform(0, np.pi, total))),
    }


def _render_lesions(
    lesions: dict[str, np.ndarray], lo: int, hi: int, ub: np.ndarray, vb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Soft lesion occupancy maps (B, H, W) of subjects lo..hi-1: for T2/FLAIR, and for T1.

    Loops over lesion *slots* (the k-th lesion of every subject in the block that has one), so work
    scales with the number of lesions, not with B x max count.
    """
    first, last = np.searchsorted(lesions["owner"], [lo, hi])
    les = {k: v[first:last] for k, v in lesions.items()}
    owner = les["owner"] - lo
    occ = np.zeros(ub.shape, dtype=np.float32)
    occ_t1 = np.zeros(ub.shape, dtype=np.float32)
    f32 = lambda a: a.astype(np.float32)[:, None, None]  # (L,) -> (L, 1, 1)
    for k in range(int(les["slot"].max(initial=-1)) + 1):
        sel = np.flatnonzero(les["slot"] == k)
        who = owner[sel]
        du, dv = ub[who] - f32(les["lu"][sel]), vb[who] - f32(les["lv"][sel])  # (L, H, W)
        c, s = f32(np.cos(les["ang"][sel])), f32(np.sin(les["ang"][sel]))
        dist = np.sqrt(((c * du + s * dv) / f32(les["la"][sel])) ** 2 + ((-s * du + c * dv) / f32(les["lb"][sel])) ** 2)
        o = np.clip((1.3 - dist) / 0.6, 0.0, 1.0) * f32(les["weight"][sel])  # soft edge, full core
        occ[who] = np.maximum(occ[who], o)
        occ_t1[who] = np.maximum(occ_t1[who], o * f32(les["dark"][sel]))
    return occ, occ_t1
