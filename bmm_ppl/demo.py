"""The main job (``bmm demo``): polynomial degree selection by exact evidence on the classic
``sin(2 pi x)`` curve-fitting data, with the Bayesian-model-averaged predictive.

Run it as ``bmm demo --out DIR``; it prints the ranked table and writes three figures to ``DIR``:
``evidence_vs_degree.png``, ``errors_vs_degree.png`` and ``bma_predictive.png``.
"""

from __future__ import annotations

import math
import pathlib

import torch

from bmm_ppl.datasets import load_sinusoidal
from bmm_ppl.inference import Exact
from bmm_ppl.models import BayesianLinearRegression, polynomial_features
from bmm_ppl.selection import compare

# Bishop (2006, section 1.2.6) uses alpha = 5e-3 and beta = 11.1 (noise sd 0.3) for these data.
PRIOR_PRECISION = 5e-3
NOISE_PRECISION = 11.1


def rms_error(posterior, x: torch.Tensor, t: torch.Tensor) -> float:
    """Root-mean-square error of the posterior-mean prediction ``phi(x) @ E[w]``."""
    mean_weights = posterior.latent_distribution.mean["w"]
    prediction = posterior.model.features(x) @ mean_weights
    return float((prediction - t).pow(2).mean().sqrt())


def least_squares_rms(features, x, t, x_test, t_test) -> tuple[float, float]:
    """Training and test RMS error of the maximum-likelihood (least-squares) fit, for contrast."""
    weights = torch.linalg.lstsq(features(x), t.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    train = float((features(x) @ weights - t).pow(2).mean().sqrt())
    test = float((features(x_test) @ weights - t_test).pow(2).mean().sqrt())
    return train, test


def degree_selection(degrees=range(10), alpha: float = PRIOR_PRECISION, beta: float = NOISE_PRECISION):
    """Fits one Bayesian polynomial per degree to the ten training points and ranks them.

    Returns:
        ``(comparison, errors)`` with ``errors = {name: {"train": ..., "test": ..., "train_ml": ...,
        "test_ml": ...}}``: RMS errors of the posterior mean and of the least-squares fit.
    """
    x, t = load_sinusoidal("train")
    x_test, t_test = load_sinusoidal("test")
    models = {f"degree {d}": BayesianLinearRegression(polynomial_features(d), alpha, beta) for d in degrees}
    comparison = compare(models, Exact(), x, t)
    errors = {}
    for name, post in comparison.posteriors.items():
        train_ml, test_ml = least_squares_rms(post.model.features, x, t, x_test, t_test)
        errors[name] = {
            "train": rms_error(post, x, t),
            "test": rms_error(post, x_test, t_test),
            "train_ml": train_ml,
            "test_ml": test_ml,
        }
    return comparison, errors


def plot_evidence(comparison, path):
    import matplotlib.pyplot as plt

    names = list(comparison.posteriors)
    degrees = [int(n.split()[-1]) for n in names]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(degrees, [comparison.evidences[n].value for n in names], "o-")
    best = int(comparison.best.split()[-1])
    ax.axvline(best, color="grey", ls=":", label=f"highest evidence: degree {best}")
    ax.set_xlabel("polynomial degree")
    ax.set_ylabel("exact log evidence  log p(t | degree)")
    ax.set_title("Evidence against degree (alpha, beta fixed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_errors(errors, path):
    import matplotlib.pyplot as plt

    degrees = [int(n.split()[-1]) for n in errors]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(degrees, [e["train_ml"] for e in errors.values()], "o-", color="tab:blue", label="least squares: training")
    ax.plot(degrees, [e["test_ml"] for e in errors.values()], "s-", color="tab:red", label="least squares: test")
    ax.plot(degrees, [e["train"] for e in errors.values()], "o--", color="tab:blue", alpha=0.6, label="posterior mean: training")
    ax.plot(degrees, [e["test"] for e in errors.values()], "s--", color="tab:red", alpha=0.6, label="posterior mean: test")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("polynomial degree")
    ax.set_ylabel("RMS error")
    ax.set_title("Training error falls with degree; test error does not")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, off the curves
    fig.set_size_inches(8, 3.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bma(comparison, path, num_samples: int = 4000):
    import matplotlib.pyplot as plt

    x, t = load_sinusoidal("train")
    grid = torch.linspace(0, 1, 200, dtype=x.dtype, device=x.device)
    draws = comparison.predict(grid, num_samples=num_samples)["obs"]
    lower, median, upper = torch.quantile(draws, torch.tensor([0.025, 0.5, 0.975], dtype=draws.dtype, device=draws.device), dim=0)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.fill_between(grid, lower, upper, alpha=0.3, label="BMA 95% predictive band")
    ax.plot(grid, median, label="BMA predictive median")
    ax.plot(grid, torch.sin(2 * math.pi * grid), "g--", label="sin(2 pi x)")
    ax.plot(x, t, "ko", mfc="none", label="training data")
    ax.set_xlabel("x")
    ax.set_ylabel("t")
    ax.set_title("Bayesian model average over degrees 0-9")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, off the band
    fig.set_size_inches(8, 3.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out_dir="bmm_demo_output", quick: bool = False, stream=print) -> dict:
    """Runs the demo and writes its figures to ``out_dir``; returns the comparison and errors.

    Args:
        out_dir: folder for the figures (created if missing).
        quick: fewer predictive draws, for tests.
        stream: where the report goes (``print`` by default).
    """
    import matplotlib

    matplotlib.use("Agg")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comparison, errors = degree_selection()
    table = comparison.table
    for column in ("train_ml", "test_ml", "test"):
        table[f"{column}_rms"] = [errors[n][column] for n in table.index]
    stream(f"Polynomial degree selection on the ten sin(2 pi x) points (alpha={PRIOR_PRECISION}, beta={NOISE_PRECISION}):")
    stream(table.drop(columns=["stderr", "prior"]).to_string(float_format=lambda v: f"{v:.4g}"))
    stream(f"Highest evidence: {comparison.best}")
    plot_evidence(comparison, out / "evidence_vs_degree.png")
    plot_errors(errors, out / "errors_vs_degree.png")
    plot_bma(comparison, out / "bma_predictive.png", num_samples=500 if quick else 4000)
    stream(f"Figures written to {out.resolve()}")
    return {"comparison": comparison, "errors": errors, "out_dir": out}
