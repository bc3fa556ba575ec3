"""A realistic synthetic multi-centre cohort for the lumbar fasciitis nomogram (seed 000).

Each hospital gets a folder with a ``manifest.csv`` and one axial T2-like MR volume plus
ROI mask per patient, at the L4/5 level, as the radiologist of seed 000 would draw it
(erector spinae + multifidus + the posterior fat with the thoracolumbar fascia).

How a case is made
------------------
1. *Clinical variables* are drawn per class from seed 000's Table 2 (training set):
   age 39.6±14.6 vs 51.8±15.3 y, Cobb 32.9±4.6 vs 24.1±4.6°, fat 1.5±0.7 vs 2.4±0.9 cm,
   40 % male. Independent Table 2 variables alone would give a clinical AUC of 0.95
   (the nomogram target is 0.85-0.95), so three documented departures make the
   clinical model realistic rather than near-perfect:

   * within-class correlations (age-Cobb -0.3, age-fat +0.25, Cobb-fat -0.3: lordosis
     flattens and fat grows with age); they keep every marginal mean and SD;
   * ``ATYPICAL_FRACTION`` (10 %) of patients present atypically: their clinical
     variables are drawn from the *other* class's Table 2 distribution (young, slim
     patients with fasciitis; older, heavier patients without). Their images still
     show their true status. Class means thus move by 10 % of the Table 2 difference
     (e.g. Cobb 32.0 vs 25.0° instead of 32.9 vs 24.1°);
   * each site measures the Cobb angle with its own reader noise
     (``ScannerProfile.cobb_reader_sd``, 1.5-3°).

   Population clinical AUC (age, sex, Cobb, fat; logistic): about 0.82.
2. *Anatomy* is built analytically on a fine "truth" grid (0.5 x 0.5 x 1 mm, 92 x 72 x
   32 mm; arrays in (z, y, x) order, LPS: x to the patient's left, y to the back):
   laminae, spinous process (or interspinous ligament), facets, the spinal canal,
   multifidus and erector spinae with cranio-caudal fibre texture and age-dependent
   fatty marbling, the thoracolumbar fascia, subcutaneous fat with septa whose
   thickness follows the patient's ``fat_thickness`` (8 mm of image per cm, clipped
   to fit the field of view), skin and air. The patient is slightly shifted and
   rotated.
3. *Disease* (severity 0-1; fasciitis ~ 0.05 + 0.95 Beta(1.4, 2.6), and half of the
   normal patients get mild incidental changes up to 0.4, so the classes overlap)
   adds patchy hyperintense thickening along the fascia, fluid strands in the
   posterior fat running along the fascia, a midline triangular hyperintensity at the
   spinous process tip and heterogeneous oedema in the superficial muscle, all scaled
   by ``DISEASE_CONTRAST``.
4. *Acquisition* by the site's scanner (``ScannerProfile``): tissue contrast (a power
   law, standing for TR/TE), in-plane Gaussian PSF plus voxel integration, a slice
   profile (box of the slice thickness), resampling to the site's voxel grid (field of
   view 90 x 70 x 30 mm), a receive-coil bias field, Rician noise, then
   ``gain * s + offset`` stored as int16. The mask is the truth ROI integrated over
   each voxel and thresholded at 0.5, on exactly the image's grid.

Measured (``python -m radfed.experiments.benchmarks.synth_quality --sites 3
--patients 80 --pyradiomics 80``; held-out AUCs are medians over 20 stratified 70/30
splits; site accuracy is nearest-centroid, 5-fold CV, chance 0.33)
------------------------------------------------------------------------------------
================================================  ==========  ==========
quantity                                          seed 0      seed 1
================================================  ==========  ==========
clinical-only AUC (logistic on 4 variables)       0.81        0.78
radiomics-only AUC (pyradiomics, top-30 + LASSO)  0.86        0.85
nomogram AUC (clinical + radiomics score)         0.90        0.86
image-only AUC, 12 simple ROI statistics          0.72        0.76
site accuracy, raw ROI mean / SD / median         0.94        0.96
site accuracy, 12 z-scored ROI statistics         0.82        0.76
site accuracy, 851 pyradiomics features           0.97        0.97
================================================  ==========  ==========

With 72 held-out patients an AUC has a standard error of about 0.04, hence the spread
between seeds. ``DISEASE_CONTRAST`` and ``ATYPICAL_FRACTION`` are the two knobs: the
first moves the radiomics AUC, the second the clinical one.

pyradiomics 3.0.1 settings: 1 mm BSpline resampling, normalise (scale 100), bin width
25, original + wavelet, all default feature classes: 2.8 CPU s per case (the ROI is
~110 000 voxels at 1 mm; about a third of the time is pyradiomics' shape and binning).
Writing takes 0.25-0.33 CPU s per case (3 x 60 patients: 46 CPU s, 31 MB; peak memory
0.3 GB), i.e. about 1 min for 3 x 60 on an idle core.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage, special
from tqdm import tqdm

from radfed.shared.errors import RadfedError

__all__ = [
    "ATYPICAL_FRACTION",
    "MANIFEST_COLUMNS",
    "SITE_PROFILES",
    "TABLE2",
    "ScannerProfile",
    "SynthError",
    "draw_clinical",
    "simulate_case",
    "site_name",
    "write_cohort",
]

FloatArray = NDArray[np.float32]
BoolArray = NDArray[np.bool_]

MANIFEST_COLUMNS = (
    "patient_id",
    "image",
    "mask",
    "fasciitis",
    "age",
    "sex",
    "cobb_angle",
    "fat_thickness",
    "scanner",
)
#: Extra manifest columns of a cohort written with ``second_reader=True``.
READER_COLUMNS = ("mask_reader2", "mask_repeat")
#: Boundary disagreement of the second reader and of the first reader's repeat: SD (mm)
#: of a smooth random displacement of the ROI boundary, SD (mm) of a per-case
#: systematic offset (drawing wider or tighter), and the smoothness (mm) of the field.
READER2_JITTER = (1.5, 0.5, 5.0)
REPEAT_JITTER = (0.75, 0.25, 5.0)
SYNTH_VERSION = 1
MARKER = ".radfed_synth.json"  # marks a folder as ours, so a rerun may overwrite it


class SynthError(RadfedError, ValueError):
    """Bad arguments to the cohort generator (a ValueError the CLI prints plainly)."""


@dataclass(frozen=True)
class ScannerProfile:
    """One hospital's scanner: everything that makes its images differ from the others'.

    Attributes
    ----------
    name : str
        Profile name, written to the manifest's ``scanner`` column.
    spacing : tuple of float
        Voxel spacing (x, y, z) in mm; z is the slice thickness (no gap).
    gain, offset : float
        Stored value = gain * signal + offset, where fat has signal ~1.
    noise_sd : float
        SD of each complex noise channel, relative to fat (Rician magnitude noise).
    blur_mm : float
        SD in mm of the in-plane Gaussian point-spread function.
    prevalence : float
        Fraction of the site's patients with fasciitis.
    contrast : float
        Exponent applied to the tissue signal (TR/TE differences: >1 darkens muscle
        relative to fat and fluid).
    bias : float
        Receive-coil bias: relative brightening from the front to the back of the field
        of view (the spine coil is under the patient's back).
    cobb_reader_sd : float
        SD in degrees of this site's Cobb angle measurement error.
    """

    name: str
    spacing: tuple[float, float, float]
    gain: float
    offset: float
    noise_sd: float
    blur_mm: float
    prevalence: float
    contrast: float = 1.0
    bias: float = 0.0
    cobb_reader_sd: float = 2.0


SITE_PROFILES: tuple[ScannerProfile, ...] = (
    # name, spacing, gain, offset, noise_sd, blur_mm, prevalence, contrast, bias, cobb_reader_sd
    ScannerProfile("GE_MR750_3T", (0.7, 0.7, 3.5), 900.0, 0.0, 0.030, 0.35, 0.50, 1.00, 0.25, 2.0),
    ScannerProfile(
        "SIEMENS_AERA_1.5T", (0.9, 0.9, 4.0), 420.0, 40.0, 0.075, 0.70, 0.45, 0.80, 0.50, 3.0
    ),
    ScannerProfile(
        "PHILIPS_INGENIA_3T", (0.6, 0.6, 3.0), 1900.0, 0.0, 0.045, 0.25, 0.55, 1.30, 0.10, 1.5
    ),
    ScannerProfile(
        "GE_SIGNA_1.5T", (1.1, 1.1, 5.0), 300.0, 120.0, 0.090, 0.85, 0.48, 0.90, 0.70, 2.5
    ),
    ScannerProfile(
        "SIEMENS_SKYRA_3T", (0.8, 0.8, 3.0), 1250.0, 10.0, 0.025, 0.50, 0.52, 1.15, 0.35, 2.0
    ),
    ScannerProfile(
        "UIH_UMR780_3T", (1.0, 1.0, 4.0), 650.0, 60.0, 0.055, 0.60, 0.50, 0.75, 0.15, 3.0
    ),
)

# Seed 000, Table 2 (training set): (mean, SD) per class; sex is P(male).
TABLE2: dict[int, dict[str, tuple[float, float]]] = {
    0: {"age": (39.6, 14.6), "cobb_angle": (32.9, 4.6), "fat_thickness": (1.5, 0.7)},
    1: {"age": (51.8, 15.3), "cobb_angle": (24.1, 4.6), "fat_thickness": (2.4, 0.9)},
}
P_MALE = 0.40
# Within-class correlation of (age, cobb_angle, fat_thickness); keeps the marginals.
WITHIN_CLASS_CORR = np.array([[1.0, -0.3, 0.25], [-0.3, 1.0, -0.3], [0.25, -0.3, 1.0]])
ATYPICAL_FRACTION = 0.10
AGE_RANGE = (15, 85)
COBB_RANGE = (5.0, 60.0)
FAT_RANGE = (0.2, 5.5)

# Truth grid: (x, y, z) step in mm and half-extent; x = patient left, y = posterior (LPS).
TRUTH_STEP = (0.5, 0.5, 1.0)
TRUTH_HALF = (46.0, 36.0, 16.0)
FOV_MM = (90.0, 70.0, 30.0)  # the site grid's nominal field of view

# Tissue signal on T2 FSE, relative to subcutaneous fat.
FAT, MUSCLE, FASCIA, FLUID, SKIN = 1.0, 0.30, 0.10, 1.5, 0.45
CORTEX, MARROW, LIGAMENT, OTHER_MUSCLE = 0.06, 0.55, 0.12, 0.27
# Scales every fasciitis change: tuned so that radiomics alone gives an AUC near 0.85.
DISEASE_CONTRAST = 0.85


# --------------------------------------------------------------------------- clinical


def draw_clinical(
    rng: np.random.Generator, fasciitis: int, profile: ScannerProfile
) -> dict[str, float | int]:
    """Draw one patient's clinical variables, as the site would record them.

    Parameters
    ----------
    rng : numpy.random.Generator
        The patient's generator.
    fasciitis : int
        True status (0/1).
    profile : ScannerProfile
        The site's profile (for its Cobb reader noise).

    Returns
    -------
    dict
        ``age`` (int), ``sex`` (1 male), ``cobb_angle`` (deg, 1 dp), ``fat_thickness``
        (cm, 2 dp) and ``atypical`` (1 if drawn from the other class).
    """
    atypical = int(rng.random() < ATYPICAL_FRACTION)
    stats = TABLE2[fasciitis ^ atypical]
    z = rng.multivariate_normal(np.zeros(3), WITHIN_CLASS_CORR, method="cholesky")
    age, cobb, fat = (stats[k][0] + stats[k][1] * zk for k, zk in zip(stats, z, strict=True))
    cobb += rng.normal(0.0, profile.cobb_reader_sd)
    return {
        "age": int(np.clip(round(age), *AGE_RANGE)),
        "sex": int(rng.random() < P_MALE),
        "cobb_angle": round(float(np.clip(cobb, *COBB_RANGE)), 1),
        "fat_thickness": round(float(np.clip(fat, *FAT_RANGE)), 2),
        "atypical": atypical,
    }


def _severity(rng: np.random.Generator, fasciitis: int) -> float:
    """Disease severity 0-1: overlapping classes so the image is informative, not perfect."""
    if fasciitis:
        return float(0.05 + 0.95 * rng.beta(1.4, 2.6))
    return float(rng.uniform(0.0, 0.4)) if rng.random() < 0.5 else 0.0


# --------------------------------------------------------------------------- fields


def _unit(field: FloatArray) -> FloatArray:
    """Zero mean, unit SD."""
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _noise(
    rng: np.random.Generator, shape: Sequence[int], sigma: Sequence[float], coarse: bool = False
) -> FloatArray:
    """Smooth Gaussian random field (unit SD); ``sigma`` in truth voxels (z, y, x).

    With ``coarse``, the field is made on a grid twice as coarse and linearly
    interpolated up: ~8 times cheaper for long correlation lengths, and looks the same.
    """
    small = [(n + 1) // 2 for n in shape] if coarse else list(shape)
    field = rng.standard_normal(small, dtype=np.float32)
    scale = 2.0 if coarse else 1.0
    field = ndimage.gaussian_filter(field, [s / scale for s in sigma], mode="wrap")
    if coarse:
        for axis, n in enumerate(shape):
            field = _upsample2(field, axis)
            field = np.take(field, np.arange(n), axis=axis)
    return _unit(field)


def _upsample2(a: FloatArray, axis: int) -> FloatArray:
    """Linear interpolation to twice the samples along ``axis`` (periodic, cell-centred)."""
    prev, nxt = np.roll(a, 1, axis=axis), np.roll(a, -1, axis=axis)
    out = np.stack([0.75 * a + 0.25 * prev, 0.75 * a + 0.25 * nxt], axis=axis + 1)
    shape = list(a.shape)
    shape[axis] *= 2
    return out.reshape(shape)


def _ramp(x: FloatArray) -> FloatArray:
    """Cheap logistic-like step 0 -> 1 over x in [-2, 2]."""
    return np.clip(0.5 + 0.25 * x, 0.0, 1.0)


def _truth_axes() -> tuple[FloatArray, FloatArray, FloatArray]:
    """Voxel-centre coordinates (x, y, z) in mm of the truth grid."""
    axes = [
        np.arange(-h + s / 2, h, s, dtype=np.float32)
        for h, s in zip(TRUTH_HALF, TRUTH_STEP, strict=True)
    ]
    return axes[0], axes[1], axes[2]


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Body:
    """Per-patient anatomical parameters in mm."""

    lamina_y: float  # posterior surface of the lamina at the midline
    fascia_y: float  # thoracolumbar fascia over the muscle bellies' base line
    fascia_t: float
    fat_mm: float
    skin_mm: float
    sp_half: float  # half-width of the spinous process
    sp_top: float  # z above which the interspinous ligament replaces the process
    mus_xc: float  # centre and half-width of each muscle compartment
    mus_ax: tuple[float, float]  # (right, left)
    mf_div: float  # multifidus / erector spinae border at the lamina
    marbling: float  # fraction of intramuscular fat
    shift: tuple[float, float]
    angle: float  # in-plane rotation, radians


def _draw_body(rng: np.random.Generator, age: int, fat_cm: float) -> _Body:
    lamina_y = -27.0 + rng.normal(0, 1.0)
    depth = float(np.clip(rng.normal(30.5, 2.5), 25.0, 35.0))
    fascia_y = lamina_y + depth
    fascia_t = rng.uniform(0.8, 1.5)
    skin = rng.uniform(1.5, 2.2)
    # The fat must fit between the fascia bulge (+2.5 mm) and the edge of the view.
    room = FOV_MM[1] / 2 - 1.0 - (fascia_y + 2.5 + fascia_t) - skin
    fat_mm = float(np.clip(8.0 * fat_cm, 2.5, room))
    ax = rng.normal(19.5, 0.8)
    marbling = np.clip(0.02 + 0.0025 * (age - 20) + rng.normal(0, 0.02), 0.005, 0.25)
    return _Body(
        lamina_y=lamina_y,
        fascia_y=fascia_y,
        fascia_t=fascia_t,
        fat_mm=fat_mm,
        skin_mm=skin,
        sp_half=rng.uniform(2.3, 3.3),
        sp_top=rng.uniform(-6.0, 8.0),
        mus_xc=rng.uniform(17.5, 19.5),
        mus_ax=(ax + rng.normal(0, 0.6), ax + rng.normal(0, 0.6)),
        mf_div=rng.uniform(11.0, 14.0),
        marbling=float(marbling),
        shift=(rng.normal(0, 1.5), rng.normal(0, 1.0)),
        angle=float(np.deg2rad(rng.normal(0, 3.0))),
    )


def _soft(d: FloatArray, width: float) -> FloatArray:
    """Smooth step 0 -> 1 as the signed distance ``d`` (mm) crosses 0: partial volume."""
    return _ramp(d / width)


def _anatomy(
    rng: np.random.Generator, body: _Body, severity: float
) -> tuple[FloatArray, FloatArray]:
    """Tissue signal and ROI fraction on the truth grid, arrays in (z, y, x) order."""
    x, y, z = _truth_axes()
    shape = (z.size, y.size, x.size)
    cos, sin = np.cos(body.angle), np.sin(body.angle)
    X = (cos * x[None, :] + sin * y[:, None] - body.shift[0])[None].astype(np.float32)
    Y = (-sin * x[None, :] + cos * y[:, None] - body.shift[1])[None].astype(np.float32)
    Z = z[:, None, None]
    ax_ = np.abs(X)
    side_ax = np.where(X < 0, body.mus_ax[0], body.mus_ax[1]).astype(np.float32)

    # Boundaries, each with a little waviness in (z, x).
    def wavy(amp: float, sx: float) -> FloatArray:
        return amp * _noise(rng, (z.size, 1, x.size), (2.0, 0.0, sx / TRUTH_STEP[0]))

    fascia = (
        body.fascia_y
        + 2.5 * np.exp(-(((ax_ - 18.0) / 14.0) ** 2))
        - 5.0 * np.exp(-(X**2) / 32.0)
        - 0.003 * X**2
        + wavy(0.5, 6.0)
    )
    fascia_out = fascia + body.fascia_t
    skin_in = (
        body.fascia_y
        + 2.5
        + body.fascia_t
        + body.fat_mm
        - 0.002 * X**2
        - 2.0 * np.exp(-(X**2) / 128.0)
        + wavy(0.6, 10.0)
    )
    lamina = body.lamina_y - 0.35 * np.minimum(ax_, 24.0)
    sp_tip = fascia - 1.0

    # Bone: lamina band, facets, spinous process below sp_top.
    in_lamina = (ax_ < 24.0) & (Y <= lamina) & (Y > lamina - 5.0)
    facet = ((ax_ - 22.0) / 5.0) ** 2 + ((Y - body.lamina_y + 8.0) / 4.0) ** 2 < 1.0
    spinous = (Z < body.sp_top) & (ax_ < body.sp_half) & (Y > lamina) & (Y < sp_tip)
    ligament = (Z >= body.sp_top) & (ax_ < 1.2) & (Y > lamina) & (Y < sp_tip)
    bone = in_lamina | facet | spinous
    marrow = (
        (in_lamina & (Y < lamina - 1.0) & (Y > lamina - 4.0))
        | (spinous & (ax_ < body.sp_half - 0.9) & (Y < sp_tip - 1.0))
        | (((ax_ - 22.0) / 4.0) ** 2 + ((Y - body.lamina_y + 8.0) / 3.0) ** 2 < 1.0)
    )
    canal = (X / 11.0) ** 2 + ((Y - body.lamina_y + 16.0) / 10.0) ** 2 < 1.0

    # Muscle compartment per side: a superellipse clipped by bone, midline and fascia.
    yc = (body.lamina_y - 6.0 + body.fascia_y + 2.5) / 2.0
    ay = (body.fascia_y + 2.5 - body.lamina_y + 6.0) / 2.0 + 4.0
    ellipse = np.abs((ax_ - body.mus_xc) / side_ax) ** 2.5 + np.abs((Y - yc) / ay) ** 2.5
    midline = np.where(Z < body.sp_top, body.sp_half, 1.2).astype(np.float32)
    muscle_w = (
        _soft(1.0 - ellipse, 0.04)
        * _soft(fascia - Y, 0.25)
        * _soft(Y - lamina, 0.25)
        * _soft(ax_ - midline - 0.3, 0.25)
    )
    muscle_w *= ~bone
    mf_border = body.mf_div + 0.15 * (Y - body.lamina_y)
    multifidus = ax_ < mf_border

    # Texture: fibres run cranio-caudally, so they show as fine speckle in-plane.
    fibre = _noise(rng, shape, (3.0, 0.8, 0.8))
    marb = _noise(rng, shape, (5.0, 1.2, 1.2))
    marb_w = _ramp((marb - float(special.ndtri(1.0 - body.marbling))) / 0.15)
    muscle_sig = (
        MUSCLE * np.where(multifidus, np.float32(1.08), np.float32(1.0)) * (1.0 + 0.10 * fibre)
    )
    plane = np.exp(-(((ax_ - mf_border) / 0.45) ** 2))  # fat plane between MF and ES
    muscle_sig = muscle_sig * (1 - marb_w) + 0.9 * FAT * marb_w
    muscle_sig = muscle_sig * (1 - plane) + 0.85 * FAT * plane

    septa_f = _noise(rng, shape, (3.0, 4.0, 4.0), coarse=True)
    septa = np.exp(-((septa_f / 0.08) ** 2))
    fat_depth = np.maximum(skin_in - fascia_out, 1.0)
    sup_fascia = np.exp(-(((Y - fascia_out - 0.45 * fat_depth) / 0.35) ** 2))
    fat_sig = FAT * (1 + 0.03 * fibre) * (1 - 0.55 * np.maximum(septa, 0.8 * sup_fascia))

    # Compose by layers, from the back (air) inwards.
    sig = np.zeros(shape, np.float32)
    w_skin = _soft(skin_in + body.skin_mm - Y, 0.3)
    sig += SKIN * w_skin
    w_fat = _soft(skin_in - Y, 0.3) * _soft(Y - fascia_out, 0.2)
    sig = sig * (1 - w_fat) + fat_sig * w_fat
    w_fascia = _soft(fascia_out - Y, 0.2) * _soft(Y - fascia, 0.2)
    sig = sig * (1 - w_fascia) + FASCIA * w_fascia
    deep = _soft(fascia - Y, 0.2)  # everything in front of the fascia
    other = OTHER_MUSCLE * (1 + 0.08 * fibre) * (1 - 0.6 * septa) + FAT * 0.6 * septa
    raphe = np.exp(-(((ellipse - 1.06) / 0.05) ** 2))  # fat plane around the compartment
    other = other * (1 - 0.7 * raphe) + 0.8 * FAT * 0.7 * raphe
    sig = sig * (1 - deep) + other * deep
    sig = np.where(canal, FLUID, sig)
    sig = np.where(ligament, LIGAMENT, sig)
    sig = np.where(bone, np.where(marrow, MARROW * (1 + 0.1 * marb), CORTEX), sig)
    sig = sig * (1 - muscle_w) + muscle_sig * muscle_w

    # ROI: both muscles + fascia + fat behind the muscles (laterally up to their edge).
    behind = (ax_ < body.mus_xc + side_ax) & ~bone
    roi = np.maximum(muscle_w, (w_fat + w_fascia) * behind).astype(np.float32)
    if severity > 0:
        sig = _add_fasciitis(rng, sig, severity, X, Y, fascia, fascia_out, sp_tip, muscle_w, w_fat)
    return sig.astype(np.float32), roi


def _add_fasciitis(
    rng: np.random.Generator,
    sig: FloatArray,
    s: float,
    X: FloatArray,
    Y: FloatArray,
    fascia: FloatArray,
    fascia_out: FloatArray,
    sp_tip: FloatArray,
    muscle_w: FloatArray,
    fat_w: FloatArray,
) -> FloatArray:
    """T2 changes of superficial fasciitis with severity ``s`` (0-1)."""
    shape = sig.shape
    ax_ = np.abs(X)
    # Patchy along the fascia: a thresholded (z, x) field covering more as s grows.
    cover = min(0.2 + 0.75 * s, 0.95)
    patch2d = _noise(rng, (shape[0], 1, shape[2]), (2.5, 0.0, 10.0))
    patch = _ramp((patch2d - float(special.ndtri(1.0 - cover))) / 0.3)

    # 1. Thickened, hyperintense fascia (streak along the fascia).
    below, above = 0.3 + 1.2 * s, 0.5 + 2.5 * s
    band = _soft(Y - (fascia - below), 0.3) * _soft(fascia_out + above - Y, 0.3)
    amount = DISEASE_CONTRAST * (0.25 + 0.5 * s) * patch * band
    sig = sig * (1 - amount) + FLUID * amount

    # 2. Fluid strands in the fat, elongated along the fascia, fading with depth.
    strands_f = _noise(rng, shape, (3.0, 1.6, 8.0), coarse=True)
    d_fat = np.maximum(Y - fascia_out, 0.0)
    strands = np.exp(-((strands_f / 0.25) ** 2)) * np.exp(-d_fat / (2.0 + 10.0 * s)) * fat_w
    sig = sig + DISEASE_CONTRAST * (FLUID - FAT + 0.3) * min(1.0, 0.3 + s) * strands * patch

    # 3. Midline triangle of high signal at the tip of the spinous process.
    if rng.random() < s:
        apex = sp_tip - 2.0
        base = fascia_out + 2.0 + 4.0 * s
        half = (2.0 + 5.0 * s) * np.clip((Y - apex) / np.maximum(base - apex, 1.0), 0, 1)
        tri = _soft(half - ax_, 0.4) * _soft(base - Y, 0.4) * _soft(Y - apex, 0.4)
        w_tri = 0.5 * DISEASE_CONTRAST * tri
        sig = sig * (1 - w_tri) + FLUID * w_tri

    # 4. Heterogeneous oedema in the superficial muscle.
    depth = np.maximum(fascia - Y, 0.0)
    hetero = np.clip(0.5 + 0.5 * _noise(rng, shape, (2.0, 3.0, 3.0), coarse=True), 0, 1)
    oedema = DISEASE_CONTRAST * 0.4 * s * hetero * np.exp(-depth / (2.0 + 5.0 * s)) * muscle_w
    return sig + oedema * (0.5 + 0.5 * patch)


# --------------------------------------------------------------------------- scanner


def _site_grid(profile: ScannerProfile) -> tuple[tuple[int, int, int], tuple[float, ...]]:
    """Size (x, y, z) and origin of a site's voxel grid, centred on the field of view."""
    size = tuple(max(1, round(f / s)) for f, s in zip(FOV_MM, profile.spacing, strict=True))
    origin = tuple(-(n - 1) * s / 2 for n, s in zip(size, profile.spacing, strict=True))
    return (size[0], size[1], size[2]), origin


def _acquire(
    rng: np.random.Generator, sig: FloatArray, roi: FloatArray, profile: ScannerProfile
) -> tuple[NDArray[np.int16], NDArray[np.uint8]]:
    """Image the truth with the site's scanner; arrays returned in (z, y, x) order."""
    size, origin = _site_grid(profile)
    sx, sy, sz = profile.spacing
    tx, ty, tz = TRUTH_STEP

    def integrate(vol: FloatArray, psf_mm: float) -> FloatArray:
        # Slice profile: box of the slice thickness; in-plane: PSF + voxel area.
        vol = ndimage.uniform_filter1d(vol, max(1, round(sz / tz)), axis=0, mode="nearest")
        sig_x = np.sqrt(psf_mm**2 + max(sx**2 - tx**2, 0) / 12) / tx
        sig_y = np.sqrt(psf_mm**2 + max(sy**2 - ty**2, 0) / 12) / ty
        return ndimage.gaussian_filter(vol, (0, sig_y, sig_x), mode="nearest")

    # Site voxel centres as fractional truth indices.
    axes = []
    for n, o, s, t, h in zip(
        size[::-1], origin[::-1], (sz, sy, sx), (tz, ty, tx), TRUTH_HALF[::-1], strict=True
    ):
        axes.append(((o + s * np.arange(n)) + h) / t - 0.5)
    coords = np.meshgrid(*axes, indexing="ij")

    def sample(vol: FloatArray) -> FloatArray:
        return ndimage.map_coordinates(vol, coords, order=1, mode="nearest").astype(np.float32)

    contrasted = np.power(np.maximum(sig, 0.0), profile.contrast)
    img = sample(integrate(contrasted, profile.blur_mm))
    mask = sample(integrate(roi, 0.0)) >= 0.5

    # Receive-coil bias: brighter towards the back, slightly tilted left-right.
    _, yy, xx = np.meshgrid(
        *[
            o + s * np.arange(n)
            for n, o, s in zip(size[::-1], origin[::-1], (sz, sy, sx), strict=True)
        ],
        indexing="ij",
    )
    tilt = rng.normal(0.0, 0.05)
    bias = 1.0 + profile.bias * (yy / FOV_MM[1]) + tilt * profile.bias * (xx / FOV_MM[0])
    img = img * bias.astype(np.float32)

    noise = rng.normal(0.0, profile.noise_sd, (2, *img.shape)).astype(np.float32)
    img = np.hypot(img + noise[0], noise[1])  # Rician magnitude
    stored = np.clip(np.rint(profile.gain * img + profile.offset), 0, np.iinfo(np.int16).max)
    return stored.astype(np.int16), mask.astype(np.uint8)


def simulate_case(
    profile: ScannerProfile,
    fasciitis: int,
    age: int,
    fat_thickness: float,
    rng: np.random.Generator,
    severity: float | None = None,
) -> tuple[sitk.Image, sitk.Image, float]:
    """Make one patient's image and mask as ``profile``'s scanner would acquire them.

    Parameters
    ----------
    profile : ScannerProfile
        The scanner.
    fasciitis : int
        True status (0/1); sets the disease severity.
    age : int
        Years; drives fatty marbling of the muscles.
    fat_thickness : float
        Subcutaneous fat thickness in cm; sets the posterior fat in the image.
    rng : numpy.random.Generator
        The patient's generator (consumed).
    severity : float, optional
        Disease severity 0-1; drawn for the class when omitted. Given, it makes paired
        cases: the same generator state then yields the same anatomy.

    Returns
    -------
    image : SimpleITK.Image
        int16 volume with the profile's spacing.
    mask : SimpleITK.Image
        uint8 0/1 ROI on exactly the image's grid.
    severity : float
        The disease severity used (0-1).
    """
    if severity is None:
        severity = _severity(rng, fasciitis)
    elif not 0.0 <= severity <= 1.0:
        raise SynthError(f"severity must be within 0-1, got {severity}")
    body = _draw_body(rng, age, fat_thickness)
    sig, roi = _anatomy(rng, body, severity)
    img_arr, mask_arr = _acquire(rng, sig, roi, profile)
    _, origin = _site_grid(profile)
    image = sitk.GetImageFromArray(img_arr)
    image.SetSpacing(profile.spacing)
    image.SetOrigin(origin)
    mask = sitk.GetImageFromArray(mask_arr)
    mask.CopyInformation(image)
    return image, mask, severity


# --------------------------------------------------------------------------- cohort


def reader_mask(
    mask: sitk.Image,
    rng: np.random.Generator,
    jitter_mm: float,
    offset_mm: float,
    smooth_mm: float = 4.0,
) -> sitk.Image:
    """Another reading of a ROI: its boundary moved by a smooth random displacement.

    The signed distance to the boundary (mm, positive inside) plus a smooth Gaussian
    random field of SD ``jitter_mm`` (correlation length ``smooth_mm``) plus one
    per-case offset of SD ``offset_mm`` is thresholded at zero: the ROI grows where the
    field is positive and shrinks where it is negative, as two radiologists' outlines
    differ. The result is on exactly the mask's grid; voxels deep inside or far outside
    the ROI never change.
    """
    inside = sitk.GetArrayFromImage(mask).astype(bool)
    sampling = mask.GetSpacing()[::-1]
    depth = ndimage.distance_transform_edt(inside, sampling=sampling)
    distance = ndimage.distance_transform_edt(~inside, sampling=sampling)
    # Half a voxel step puts the boundary between the last inside and first outside voxel.
    half = 0.5 * min(sampling)
    signed = np.where(inside, depth - half, -(distance - half))
    field = ndimage.gaussian_filter(
        rng.standard_normal(inside.shape), [smooth_mm / s for s in sampling], mode="wrap"
    )
    field *= jitter_mm / max(float(field.std()), 1e-12)
    moved = signed + field + rng.normal(0.0, offset_mm) > 0
    out = sitk.GetImageFromArray(moved.astype(np.uint8))
    out.CopyInformation(mask)
    return out


def _series_info(profile: ScannerProfile, pid: str):
    """DICOM headers of a synthetic site's scanner, from the profile name MAKER_MODEL_FIELD."""
    from radfed.client.dicom_export import SeriesInfo

    maker, model, field = profile.name.split("_")
    return SeriesInfo(
        patient_id=pid,
        manufacturer=maker,
        model=model,
        field_strength=float(field.rstrip("T")),
        slice_thickness=profile.spacing[2],
    )


def site_name(index: int) -> str:
    """Letters of site ``index``: 0 -> 'a', 25 -> 'z', 26 -> 'aa' (spreadsheet style)."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return letters


def _check_args(sites: int, patients: int, seed: int) -> None:
    for name, value in (("sites", sites), ("patients", patients), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise SynthError(f"{name} must be an integer, got {value!r}")
    if sites < 1:
        raise SynthError(f"sites must be at least 1, got {sites}")
    if patients < 10:
        raise SynthError(
            f"patients must be at least 10 per site (both classes need 3+), got {patients}"
        )
    if seed < 0:
        raise SynthError(f"seed must be non-negative, got {seed}")


def _is_synth(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _check_site_dir(folder: Path) -> None:
    """Refuse a path that is a file, or a non-empty folder this generator did not write."""
    if folder.exists() and not folder.is_dir():
        raise SynthError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not _is_synth(folder):
        raise SynthError(
            f"{folder} is not empty and is not a previous synthetic cohort "
            f"(no {MARKER}); choose another output folder or empty it"
        )


def _prepare_site_dir(folder: Path) -> None:
    """Empty a previous synth output and create the subfolders.

    Everything in it goes, including files derived from the old images (features,
    caches), which would no longer match the new ones.
    """
    _check_site_dir(folder)
    if folder.is_dir():
        for child in folder.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()


def _class_labels(rng: np.random.Generator, patients: int, prevalence: float) -> NDArray[np.int64]:
    """Exactly round(prevalence * n) cases (at least 3 of each class), shuffled."""
    n_pos = int(np.clip(round(prevalence * patients), 3, patients - 3))
    labels = np.zeros(patients, np.int64)
    labels[:n_pos] = 1
    return rng.permutation(labels)


def _write_site(
    folder: Path,
    index: int,
    patients: int,
    seed: int,
    bar: tqdm,
    second_reader: bool = False,
    dicom: bool = False,
    reader_patients: int | None = None,
) -> None:
    profile = SITE_PROFILES[index % len(SITE_PROFILES)]
    # The marker goes first, so that an interrupted run can still be overwritten.
    marker = {
        "generator": "radfed.experiments.synth",
        "version": SYNTH_VERSION,
        "seed": seed,
        "site_index": index,
        "patients": patients,
        "profile": asdict(profile),
    }
    read_again = set(range(patients))
    if second_reader and reader_patients is not None and reader_patients < patients:
        marker["reader_patients"] = reader_patients
        chosen = np.random.default_rng([seed, index, 3]).permutation(patients)
        read_again = set(chosen[:reader_patients].tolist())
    (folder / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    labels = _class_labels(np.random.default_rng([seed, index, 0]), patients, profile.prevalence)
    width = max(3, len(str(patients)))
    rows = []
    for k, fasciitis in enumerate(labels):
        pid = f"{site_name(index).upper()}{k + 1:0{width}d}"
        rng = np.random.default_rng([seed, index, 1, k])  # one stream per patient
        clin = draw_clinical(rng, int(fasciitis), profile)
        image, mask, _ = simulate_case(
            profile, int(fasciitis), clin["age"], clin["fat_thickness"], rng
        )
        rel_img, rel_mask = f"images/{pid}.nii.gz", f"masks/{pid}.nii.gz"
        if dicom:
            from radfed.client.dicom_export import write_series

            rel_img = f"images/{pid}"
            write_series(image, folder / rel_img, _series_info(profile, pid))
        else:
            sitk.WriteImage(image, str(folder / rel_img), True)
        sitk.WriteImage(mask, str(folder / rel_mask), True)
        extra = ["", ""] if second_reader else []
        if second_reader and k in read_again:
            extra = []
            readers = np.random.default_rng([seed, index, 2, k])  # its own stream
            for column, (jitter, offset, smooth) in zip(
                READER_COLUMNS, (READER2_JITTER, REPEAT_JITTER), strict=True
            ):
                rel = f"masks/{pid}_{column.removeprefix('mask_')}.nii.gz"
                other = reader_mask(mask, readers, jitter, offset, smooth)
                sitk.WriteImage(other, str(folder / rel), True)
                extra.append(rel)
        rows.append(
            [
                pid,
                rel_img,
                rel_mask,
                int(fasciitis),
                clin["age"],
                clin["sex"],
                f"{clin['cobb_angle']:.1f}",
                f"{clin['fat_thickness']:.2f}",
                profile.name,
                *extra,
            ]
        )
        bar.update(1)
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS + (READER_COLUMNS if second_reader else ()))
        writer.writerows(rows)


def write_cohort(
    out: str | Path,
    sites: int = 3,
    patients: int = 60,
    seed: int = 0,
    progress: bool = True,
    *,
    second_reader: bool = False,
    dicom: bool = False,
    reader_patients: int | None = None,
) -> list[Path]:
    """Write one folder per hospital (out/hospital_a, out/hospital_b, ...) and return them.

    Parameters
    ----------
    out : str or Path
        Parent folder; created if missing.
    sites : int
        Number of hospitals (>= 1); site ``i`` uses ``SITE_PROFILES[i % 6]``.
    patients : int
        Patients per site (>= 10).
    seed : int
        Non-negative seed; the same seed gives byte-identical files.
    progress : bool
        Show a progress bar on stderr.
    second_reader : bool
        Also write a second reader's mask and the first reader's repeat per patient
        (:func:`reader_mask`; columns ``mask_reader2`` and ``mask_repeat``), for the
        study's reproducibility (ICC) filter. Images and first masks do not change.
    reader_patients : int, optional
        With ``second_reader``, write those masks for this many patients per site only,
        drawn at random (seed 000 measured reproducibility on a subset of its cases);
        the other rows leave both columns empty. A patient's reader masks are the same
        whatever the subset. None (the default) or ``patients`` or more: every patient.
    dicom : bool
        Write each image as a DICOM series folder (``images/<patient>/``, one file per
        slice, the scanner's manufacturer, model and field strength in the headers)
        instead of NIfTI; the voxels and the grid are the same.

    Returns
    -------
    list of Path
        The site folders, in site order.

    Raises
    ------
    SynthError
        (a ``ValueError``) for bad arguments, or when a site folder exists, is not
        empty and was not written by this generator.

    Notes
    -----
    A site folder written by this generator (it holds ``.radfed_synth.json``) is
    emptied and written anew, files added to it later (e.g. ``features.parquet``)
    included. Such folders beyond ``sites`` (from an earlier, larger run) are removed,
    so that a glob of ``out/hospital_*`` finds only this cohort.
    """
    _check_args(sites, patients, seed)
    if reader_patients is not None and (
        isinstance(reader_patients, bool)
        or not isinstance(reader_patients, int | np.integer)
        or reader_patients < 1
    ):
        raise SynthError(f"reader_patients must be a positive integer, got {reader_patients!r}")
    if reader_patients is not None and not second_reader:
        raise SynthError("reader_patients needs second_reader=True")
    out = Path(out)
    folders = [out / f"hospital_{site_name(i)}" for i in range(sites)]
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out} exists and is not a folder")
    for folder in folders:  # check all before touching any
        _check_site_dir(folder)
    # Stale sites of a previous, larger synth run would be picked up by a glob.
    if out.is_dir():
        for stale in sorted(out.glob("hospital_*")):
            if stale not in folders and stale.is_dir() and _is_synth(stale):
                shutil.rmtree(stale)
    with tqdm(
        total=sites * patients, desc="synth", unit="case", file=sys.stderr, disable=not progress
    ) as bar:
        for i, folder in enumerate(folders):
            _prepare_site_dir(folder)
            _write_site(folder, i, patients, seed, bar, second_reader, dicom, reader_patients)
    return folders
