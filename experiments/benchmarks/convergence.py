"""Convergence: rounds and bytes to the pooled logistic optimum, radfed against FedAvg.

Run ``python -m radfed.experiments.benchmarks.convergence [--out DIR] [--smoke]``.

Data: the four UCI heart-disease hospitals with FLamby's Fed-Heart-Disease preparation
(``flamby/datasets/fed_heart_disease/dataset.py``): columns slope, ca and thal dropped,
rows with a missing value dropped, cp and restecg one-hot encoded (first level dropped:
13 inputs), the outcome ``num > 0``, and each centre split 66/34 into train and test
with scikit-learn's ``train_test_split(random_state=43, shuffle=True)``, stratified when
both classes have more than two patients. Inputs are standardised with the pooled
training mean and SD (what radfed's federated standardisation gives) for every method.

Methods, on the same training rows, simulated in this process (the arithmetic of each
round, not its transport; bytes are those of radfed's float64 message encoding):

* ``pooled``: the maximum-likelihood logistic fit on the pooled training rows (Newton
  to machine precision), the optimum every method is measured against.
* ``radfed-newton``: radfed's exact federated logistic fit, one Newton step per round
  (sites send X'WX, X'(y - p) and the deviance at the current coefficients, with
  ``radfed.shared.logistic``; the coordinator sums and steps). This is also the
  "one-step-per-round federated Newton" of the comparison (NVFlare's example does the
  same per round).
* ``fedavg-quickstart``: Flower's scikit-learn quickstart: every site fits
  ``LogisticRegression(max_iter=1, warm_start=True)`` (L2, C = 1) from the global
  coefficients (one local epoch of lbfgs) and the coordinator averages coefficients
  weighted by n. Its L2 penalty moves its optimum away from the pooled one. A site
  whose training rows have one class (FLamby's Switzerland split) cannot be fitted by
  LogisticRegression: it returns the global coefficients (the quickstart would fail).
* ``fedavg-lbfgs-unpenalised-E1`` / ``-E10``: the same without penalty (C = inf), 1 or
  10 local epochs.
* ``fedavg-sgd-E1``: ``SGDClassifier(loss="log_loss")``, one local epoch of SGD with a
  constant step 0.01, no penalty (every site can run it), as FLamby's FedAvg trains.

Reported per method: rounds until the pooled training log-loss is within 1e-6 of the
optimum, bytes sent and received by the coordinator until then, and the final test
accuracy (threshold 0.5) and AUC (all test rows, and the mean over centres), and the
largest coefficient difference from pooled. FLamby reports pooled accuracy 0.795 and
FedAvg 0.748 with its own training (Adam, SGD steps on the unstandardised inputs).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from radfed.experiments.benchmarks import common

TOL = 1e-6  # mean log-loss above the optimum
CENTRES = ("cleveland", "hungarian", "switzerland", "va")
FILES = {c: f"processed.{c}.data" for c in CENTRES}
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43


@dataclass
class Centre:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def flamby_centres(source: Path) -> tuple[list[Centre], list[str]]:
    """The four centres as FLamby prepares them (see the module docstring)."""
    from sklearn.model_selection import train_test_split

    frames, sets = [], []
    for name in CENTRES:
        df = pd.read_csv(source / FILES[name], header=None, na_values=["NA", "?"])
        df = df.drop(columns=[10, 11, 12]).dropna(axis=0).reset_index(drop=True)
        y = (df[13] > 0).astype(int)
        stratify = y if y.nunique() > 1 and all((y == v).sum() > 2 for v in (0, 1)) else None
        _, test_idx = train_test_split(
            np.arange(len(df)),
            test_size=1.0 - TRAIN_FRACTION,
            train_size=TRAIN_FRACTION,
            random_state=SPLIT_SEED,
            shuffle=True,
            stratify=stratify,
        )
        is_test = np.zeros(len(df), dtype=bool)
        is_test[test_idx] = True
        df["centre"], df["test"] = name, is_test
        frames.append(df)
        sets.append(is_test)
    data = pd.concat(frames, ignore_index=True)
    x = data[list(range(10))]
    x = pd.get_dummies(x, columns=[2, 6], drop_first=True).astype(float)
    names = [str(c) for c in x.columns]
    out = []
    for name in CENTRES:
        rows = (data["centre"] == name).to_numpy()
        test = data["test"].to_numpy()
        xv, yv = x.to_numpy()[rows], (data[13] > 0).to_numpy(int)[rows]
        t = test[rows]
        out.append(Centre(name, xv[~t], yv[~t].astype(float), xv[t], yv[t].astype(float)))
    return out, names


def standardise(centres: list[Centre]) -> list[Centre]:
    """Scale every input by the pooled training mean and SD (1/n), add the intercept."""
    pooled = np.vstack([c.x_train for c in centres])
    mean, sd = pooled.mean(axis=0), pooled.std(axis=0)
    sd[sd == 0] = 1.0

    def design(x: np.ndarray) -> np.ndarray:
        return np.column_stack([np.ones(len(x)), (x - mean) / sd])

    return [
        Centre(c.name, design(c.x_train), c.y_train, design(c.x_test), c.y_test) for c in centres
    ]


def log_loss(centres: list[Centre], beta: np.ndarray) -> float:
    """Mean training log-loss of the pooled rows at ``beta`` (intercept first)."""
    total, n = 0.0, 0
    for c in centres:
        eta = c.x_train @ beta
        total += float(np.sum(np.logaddexp(0.0, eta) - c.y_train * eta))
        n += len(c.y_train)
    return total / n


def payload_bytes(payload: dict) -> int:
    """Bytes of a payload in radfed's encoding (array buffers plus config values)."""
    from radfed.shared.messages import to_record

    record = to_record(payload)
    size = sum(len(a.data) for a in record["arrays"].values())
    return size + sum(len(str(k)) + len(str(v)) for k, v in record["config"].items())


@dataclass
class Trace:
    method: str
    losses: list[float] = field(default_factory=list)  # after each round
    bytes: list[int] = field(default_factory=list)  # coordinator in + out, per round
    beta: np.ndarray | None = None


def pooled_fit(centres: list[Centre]) -> np.ndarray:
    from radfed.shared.logistic import newton_pieces, newton_step

    x = np.vstack([c.x_train for c in centres])
    y = np.concatenate([c.y_train for c in centres])
    beta = np.zeros(x.shape[1])
    for _ in range(100):
        step = newton_step(newton_pieces(x, y, beta))
        beta = beta + step
        if np.max(np.abs(step)) < 1e-13:
            break
    return beta


def radfed_newton(centres: list[Centre], rounds: int) -> Trace:
    """radfed's federated Newton: one round = sites' pieces at beta, one step."""
    from radfed.shared.logistic import newton_pieces, newton_step

    trace = Trace("radfed-newton")
    beta = np.zeros(centres[0].x_train.shape[1])
    for _ in range(rounds):
        request = {"task": "logistic", "beta": beta}
        pieces = [newton_pieces(c.x_train, c.y_train, beta) for c in centres]
        sent = payload_bytes(request) * len(centres)
        received = sum(
            payload_bytes(
                {"hessian": p.hessian, "gradient": p.gradient, "deviance": p.deviance, "n": p.n}
            )
            for p in pieces
        )
        total = pieces[0]
        for p in pieces[1:]:
            total = total + p
        beta = beta + newton_step(total)
        trace.losses.append(log_loss(centres, beta))
        trace.bytes.append(sent + received)
    trace.beta = beta
    return trace


def fedavg(
    centres: list[Centre], rounds: int, solver: str, c_value: float, epochs: int, method: str
) -> Trace:
    """FedAvg of scikit-learn logistic regression, its arithmetic in this process: every
    round each site warm-starts from the global coefficients and runs ``epochs`` local
    epochs, and the coordinator averages coefficients weighted by n.

    ``solver="lbfgs"``: Flower's scikit-learn quickstart (``LogisticRegression`` with
    ``max_iter=epochs, warm_start=True``; ``C = inf`` is no penalty). It cannot fit a
    site whose training rows have one class (FLamby's Switzerland): that site sends the
    global coefficients back unchanged (the quickstart itself would fail there).
    ``solver="sgd"``: ``SGDClassifier(loss="log_loss")``, ``epochs`` passes of
    ``partial_fit`` (constant step 0.01, no penalty), which every site can run.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    p = centres[0].x_train.shape[1] - 1
    coef, intercept = np.zeros((1, p)), np.zeros(1)
    if solver == "lbfgs":
        models = [LogisticRegression(C=c_value, max_iter=epochs, warm_start=True) for _ in centres]
    else:
        models = [
            SGDClassifier(loss="log_loss", penalty=None, learning_rate="constant", eta0=0.01)
            for _ in centres
        ]
    rng = np.random.default_rng(0)
    trace = Trace(method)
    for _ in range(rounds):
        params, weights = [], []
        for model, c in zip(models, centres, strict=True):
            x, y = c.x_train[:, 1:], c.y_train
            if solver == "lbfgs" and len(np.unique(y)) < 2:
                local = (intercept.copy(), coef.copy())
            elif solver == "lbfgs":
                model.classes_ = np.array([0.0, 1.0])
                model.coef_, model.intercept_ = coef.copy(), intercept.copy()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    model.fit(x, y)
                local = (model.intercept_, model.coef_)
            else:
                model.coef_, model.intercept_ = coef.copy(), intercept.copy()
                model.classes_ = np.array([0.0, 1.0])
                for _ in range(epochs):
                    order = rng.permutation(len(y))
                    model.partial_fit(x[order], y[order], classes=np.array([0.0, 1.0]))
                local = (model.intercept_, model.coef_)
            params.append(np.concatenate([local[0], local[1].ravel()]))
            weights.append(len(c.y_train))
        w = np.asarray(weights, dtype=float)
        beta = np.average(np.vstack(params), axis=0, weights=w)
        intercept, coef = beta[:1].copy(), beta[1:][None, :].copy()
        sent = payload_bytes({"task": "fit", "beta": beta}) * len(centres)
        received = sum(
            payload_bytes({"beta": q, "n": int(n)}) for q, n in zip(params, w, strict=True)
        )
        trace.losses.append(log_loss(centres, beta))
        trace.bytes.append(sent + received)
    trace.beta = np.concatenate([intercept, coef.ravel()])
    return trace


def metrics(centres: list[Centre], beta: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    probs = [1 / (1 + np.exp(-(c.x_test @ beta))) for c in centres]
    ys = [c.y_test for c in centres]
    p, y = np.concatenate(probs), np.concatenate(ys)
    per_acc = [float(np.mean((q >= 0.5) == t)) for q, t in zip(probs, ys, strict=True)]
    per_auc = [
        float(roc_auc_score(t, q)) for q, t in zip(probs, ys, strict=True) if len(set(t)) == 2
    ]
    return {
        "test_accuracy": float(np.mean((p >= 0.5) == y)),
        "test_auc": float(roc_auc_score(y, p)),
        "mean_centre_accuracy": float(np.mean(per_acc)),
        "mean_centre_auc": float(np.mean(per_auc)),
    }


def summarise(trace: Trace, optimum: float, pooled_beta: np.ndarray, centres) -> dict:
    gaps = [loss - optimum for loss in trace.losses]
    reached = next((i + 1 for i, g in enumerate(gaps) if g <= TOL), None)
    upto = reached or len(gaps)
    assert trace.beta is not None
    return {
        "method": trace.method,
        "rounds_to_1e-6": reached if reached is not None else math.nan,
        "reached": reached is not None,
        "rounds_run": len(gaps),
        "final_gap": gaps[-1],
        "bytes_to_1e-6": sum(trace.bytes[:upto]) if reached else math.nan,
        "bytes_per_round": trace.bytes[0],
        "bytes_run": sum(trace.bytes),
        "max_coef_diff": float(np.max(np.abs(trace.beta - pooled_beta))),
        **metrics(centres, trace.beta),
    }


def main(argv: list[str] | None = None) -> int:
    p = common.parser("convergence", __doc__)
    p.add_argument("--rounds", type=int, default=500, help="FedAvg rounds at most")
    p.add_argument("--data", help="heart-disease folder (default: the shared data)")
    args = p.parse_args(argv)
    from radfed.experiments.heart_disease import shared_data_dir

    info = common.machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.data) if args.data else shared_data_dir() / "heart_disease"
    raw, names = flamby_centres(source)
    centres = standardise(raw)
    rounds = 5 if args.smoke else args.rounds
    print(common.describe_machine(info))
    print(
        "FLamby split: train "
        + ", ".join(f"{c.name} {len(c.y_train)}" for c in centres)
        + f" (= {sum(len(c.y_train) for c in centres)}); test "
        + ", ".join(f"{c.name} {len(c.y_test)}" for c in centres)
        + f"; {len(names)} inputs"
    )
    pooled_beta = pooled_fit(centres)
    optimum = log_loss(centres, pooled_beta)
    traces = [
        radfed_newton(centres, min(rounds, 25)),
        fedavg(centres, rounds, "lbfgs", 1.0, 1, "fedavg-quickstart"),
        fedavg(centres, rounds, "lbfgs", math.inf, 1, "fedavg-lbfgs-unpenalised-E1"),
        fedavg(centres, rounds, "lbfgs", math.inf, 10, "fedavg-lbfgs-unpenalised-E10"),
        fedavg(centres, rounds, "sgd", math.inf, 1, "fedavg-sgd-E1"),
    ]
    pooled_row = {"method": "pooled", "final_gap": 0.0, "max_coef_diff": 0.0}
    pooled_row |= metrics(centres, pooled_beta)
    rows = [pooled_row] + [summarise(t, optimum, pooled_beta, centres) for t in traces]
    radfed = rows[1]
    for row in rows[1:]:
        row["rounds_vs_radfed"] = common.ratio(row["rounds_to_1e-6"], radfed["rounds_to_1e-6"])
        row["bytes_vs_radfed"] = common.ratio(row["bytes_to_1e-6"], radfed["bytes_to_1e-6"])
        row["bytes_per_round_vs_radfed"] = common.ratio(
            row["bytes_per_round"], radfed["bytes_per_round"]
        )
    for row in rows:
        row.update(info)
    common.write_csv(out / "convergence-summary.csv", rows)
    curve = [
        {"method": t.method, "round": i + 1, "gap": loss - optimum, "bytes": sum(t.bytes[: i + 1])}
        for t in traces
        for i, loss in enumerate(t.losses)
    ]
    common.write_csv(out / "convergence.csv", curve)
    coefs = [
        {"input": n, "pooled": b} for n, b in zip(["intercept", *names], pooled_beta, strict=True)
    ]
    for t in traces:
        for row, b in zip(coefs, t.beta, strict=True):
            row[t.method] = b
    common.write_csv(out / "convergence-coefficients.csv", coefs)

    fig, axes = common.figure(1, 2, size=(11, 4.2))
    for t in traces:
        gaps = np.maximum(np.asarray(t.losses) - optimum, 1e-16)
        axes[0, 0].loglog(np.arange(1, len(gaps) + 1), gaps, label=t.method)
        axes[0, 1].loglog(np.cumsum(t.bytes), gaps, label=t.method)
    for ax, xlabel in ((axes[0, 0], "round"), (axes[0, 1], "bytes at the coordinator")):
        ax.axhline(TOL, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training log-loss above the pooled optimum")
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_title("Fed-Heart-Disease (FLamby split), 4 centres")
    common.save_figure(fig, out / "convergence.png", info["command"])

    print(f"pooled optimum: mean training log-loss {optimum:.6f}")
    common.print_table(
        rows,
        [
            "method",
            "rounds_to_1e-6",
            "final_gap",
            "bytes_per_round",
            "bytes_to_1e-6",
            "rounds_vs_radfed",
            "test_accuracy",
            "test_auc",
            "mean_centre_accuracy",
            "max_coef_diff",
        ],
    )
    for row in rows[2:]:
        if row["reached"]:
            print(
                f"{row['method']}: {row['rounds_vs_radfed']:.1f}x radfed's rounds, "
                f"{row['bytes_vs_radfed']:.2f}x its bytes"
            )
        else:
            print(
                f"{row['method']}: not within {TOL:g} after {row['rounds_run']} rounds "
                f"(> {row['rounds_run'] / radfed['rounds_to_1e-6']:.0f}x radfed's "
                f"{radfed['rounds_to_1e-6']} rounds; gap {row['final_gap']:.2e})"
            )
    print(f"wrote {out / 'convergence.csv'}, {out / 'convergence-summary.csv'}, convergence.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
