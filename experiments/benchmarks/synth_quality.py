"""Measure the synthetic cohort: site batch effects, and what clinical and image data predict.

Run ``python -m radfed.experiments.benchmarks.synth_quality --sites 3 --patients 80``.
It writes a cohort to a temporary folder (or ``--out``), then reports

* seconds per case to write;
* site-classification accuracy (nearest centroid, 5-fold CV) from 3 raw ROI statistics
  and from 12 ROI statistics of the z-scored image (chance = 1 / sites);
* AUCs over repeated stratified 70/30 splits: clinical logistic (age, sex, Cobb, fat),
  image-only (L2 logistic on the 12 statistics), and the nomogram (clinical + the
  image model's score, fitted on the training part);
* with ``--pyradiomics N``: pyradiomics 3.0.1 CPU seconds per case on N cases per site
  (1 mm resampling, bin width 25, normalised, original + wavelet), and the same
  site accuracy and AUCs with its features, the image model then being a top-30
  F-test filter + LASSO logistic as in seed 000 (N = 0 skips it).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage, stats

from radfed.experiments.synth import write_cohort

CLINICAL = ["age", "sex", "cobb_angle", "fat_thickness"]
RAW_STATS = ["raw_mean", "raw_sd", "raw_median"]


def roi_features(image: NDArray[np.floating], mask: NDArray[np.integer]) -> dict[str, float]:
    """Simple ROI statistics: 3 on raw values, 12 on the whole-image z-scored volume.

    Parameters
    ----------
    image, mask : numpy.ndarray
        Arrays in SimpleITK's (z, y, x) order; the mask is 0/1.

    Returns
    -------
    dict
        Feature name -> value.
    """
    image = image.astype(np.float64)
    roi = mask.astype(bool)
    raw = image[roi]
    z = (image - image.mean()) / image.std()  # as pyradiomics' normalize
    v = z[roi]
    grad = np.hypot(ndimage.sobel(z, axis=1), ndimage.sobel(z, axis=2))[roi]
    local_sd = np.sqrt(
        np.maximum(
            ndimage.uniform_filter(z**2, (1, 3, 3)) - ndimage.uniform_filter(z, (1, 3, 3)) ** 2, 0
        )
    )[roi]
    p10, p25, p50, p75, p90 = np.percentile(v, [10, 25, 50, 75, 90])
    return {
        "raw_mean": float(raw.mean()),
        "raw_sd": float(raw.std()),
        "raw_median": float(np.median(raw)),
        "z_mean": float(v.mean()),
        "z_sd": float(v.std()),
        "z_p10": float(p10),
        "z_p25": float(p25),
        "z_p50": float(p50),
        "z_p75": float(p75),
        "z_p90": float(p90),
        "z_skew": float(stats.skew(v)),
        "z_kurt": float(stats.kurtosis(v)),
        "z_bright": float(np.mean(v > p90 + 0.5 * (p90 - p10))),
        "z_grad": float(grad.mean()),
        "z_local_sd": float(local_sd.mean()),
    }


def load_features(folders: Sequence[Path]) -> pd.DataFrame:
    """Manifest rows of all sites plus ``site`` and the ROI statistics of each case."""
    frames = []
    for folder in folders:
        manifest = pd.read_csv(folder / "manifest.csv")
        feats = []
        for row in manifest.itertuples():
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / row.image)))
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / row.mask)))
            feats.append(roi_features(image, mask))
        frame = pd.concat([manifest, pd.DataFrame(feats)], axis=1)
        frame["site"] = folder.name
        frame["folder"] = str(folder)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def site_accuracy(X: NDArray[np.floating], site: NDArray, seed: int = 0) -> float:
    """Cross-validated accuracy of predicting the site (nearest centroid, standardised)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import NearestCentroid
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), NearestCentroid())
    return float(cross_val_score(model, X, site, cv=cv).mean())


def _logit(c: float = 1e6):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))


def _radscore_model(k: int = 30):
    """As seed 000: a relevance filter to k features, then LASSO logistic (C by 5-fold CV)."""
    from sklearn.feature_selection import SelectKBest, f_classif
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lasso = LogisticRegressionCV(
        Cs=10, penalty="l1", solver="liblinear", cv=5, scoring="neg_log_loss", max_iter=5000
    )
    return make_pipeline(StandardScaler(), SelectKBest(f_classif, k=k), lasso)


def split_aucs(
    clinical: NDArray,
    image: NDArray,
    y: NDArray,
    repeats: int = 20,
    seed: int = 0,
    radscore: bool = False,
) -> dict[str, float]:
    """Median held-out AUC of clinical, image and combined models over 70/30 splits.

    The image model is an L2 logistic (C = 0.1) on all image features, or with
    ``radscore`` the seed's filter + LASSO. The nomogram is a logistic on the clinical
    variables plus the image model's linear score, both fitted on the training part.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedShuffleSplit

    out: dict[str, list[float]] = {"clinical": [], "image": [], "nomogram": []}
    splits = StratifiedShuffleSplit(repeats, test_size=0.3, random_state=seed)
    for train, test in splits.split(clinical, y):
        clin = _logit().fit(clinical[train], y[train])
        img = _radscore_model(min(30, image.shape[1])) if radscore else _logit(0.1)
        img.fit(image[train], y[train])
        score_tr = img.decision_function(image[train])[:, None]
        score_te = img.decision_function(image[test])[:, None]
        nomo = _logit().fit(np.hstack([clinical[train], score_tr]), y[train])
        out["clinical"].append(roc_auc_score(y[test], clin.predict_proba(clinical[test])[:, 1]))
        out["image"].append(roc_auc_score(y[test], score_te[:, 0]))
        p_nomo = nomo.predict_proba(np.hstack([clinical[test], score_te]))[:, 1]
        out["nomogram"].append(roc_auc_score(y[test], p_nomo))
    return {k: float(np.median(v)) for k, v in out.items()}


def _radiomics_case(args: tuple[str, str, bool]) -> tuple[dict[str, float], float]:
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    settings = {
        "resampledPixelSpacing": [1, 1, 1],
        "interpolator": "sitkBSpline",
        "binWidth": 25,
        "normalize": True,
        "normalizeScale": 100,
        "label": 1,
    }
    extractor = featureextractor.RadiomicsFeatureExtractor(**settings)
    image, mask, wavelet = args
    extractor.enableImageTypes(**({"Original": {}, "Wavelet": {}} if wavelet else {"Original": {}}))
    start = time.process_time()  # CPU seconds: other processes share the machine
    result = extractor.execute(image, mask)
    seconds = time.process_time() - start
    feats = {k: float(v) for k, v in result.items() if not k.startswith("diagnostics")}
    return feats, seconds


def radiomics_features(
    table: pd.DataFrame, workers: int, wavelet: bool = True
) -> tuple[pd.DataFrame, float]:
    """pyradiomics features of the given rows and the mean CPU seconds per case."""
    jobs = [
        (str(Path(r.folder) / r.image), str(Path(r.folder) / r.mask), wavelet)
        for r in table.itertuples()
    ]
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_radiomics_case, jobs))
    feats = pd.DataFrame([f for f, _ in results], index=table.index)
    return feats, float(np.mean([s for _, s in results]))


def main(argv: Sequence[str] | None = None) -> None:
    """Write a cohort, measure it and print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="keep the cohort here (default: temporary)")
    parser.add_argument(
        "--pyradiomics",
        type=int,
        default=0,
        metavar="N",
        help="extract N cases per site with pyradiomics (0: skip)",
    )
    parser.add_argument("--no-wavelet", action="store_true", help="pyradiomics: original only")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # sklearn 1.8 API notices

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        start, cpu = time.perf_counter(), time.process_time()
        folders = write_cohort(out, args.sites, args.patients, args.seed, progress=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        n = args.sites * args.patients
        print(
            f"write: {seconds:.1f} s for {n} cases ({seconds / n:.2f} s per case, "
            f"{cpu / n:.2f} CPU s)"
        )
        table = load_features(folders)
        _report(table, args.sites, args.repeats, args.seed, "simple ROI statistics")
        if args.pyradiomics > 0:
            sub = table.groupby("site", group_keys=False).head(args.pyradiomics)
            feats, per_case = radiomics_features(sub, args.workers, not args.no_wavelet)
            print(f"pyradiomics: {per_case:.2f} CPU s per case, {feats.shape[1]} features")
            feats = feats.loc[:, feats.std() > 0]
            _report(
                pd.concat([sub, feats], axis=1),
                args.sites,
                args.repeats,
                args.seed,
                "pyradiomics",
                list(feats.columns),
            )


def _report(
    table: pd.DataFrame,
    sites: int,
    repeats: int,
    seed: int,
    label: str,
    image_cols: list[str] | None = None,
) -> None:
    image_cols = image_cols or [c for c in table.columns if c.startswith("z_")]
    site = table["site"].to_numpy()
    y = table["fasciitis"].to_numpy()
    print(
        f"[{label}] n = {len(table)}, prevalence {y.mean():.2f}, chance site accuracy "
        f"{1 / sites:.2f}"
    )
    if sites > 1:
        if "raw_mean" in image_cols or label == "simple ROI statistics":
            acc_raw = site_accuracy(table[RAW_STATS].to_numpy(), site, seed)
            print(f"  site accuracy, raw ROI mean/sd/median: {acc_raw:.2f}")
        acc = site_accuracy(table[image_cols].to_numpy(), site, seed)
        print(f"  site accuracy, {len(image_cols)} image features: {acc:.2f}")
    means = table.groupby("fasciitis")[CLINICAL].mean().round(2)
    print("  clinical means by class:\n" + means.to_string())
    aucs = split_aucs(
        table[CLINICAL].to_numpy(float),
        table[image_cols].to_numpy(float),
        y,
        repeats,
        seed,
        radscore=label != "simple ROI statistics",
    )
    print("  median held-out AUC: " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()))


if __name__ == "__main__":
    main()
