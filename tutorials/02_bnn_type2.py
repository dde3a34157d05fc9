"""Tutorial 02: learning a Bayesian neural network's prior scale and noise by type-II (ELBO) maximisation.

1. A 1-D regression: a small BNN whose per-layer prior scales and noise are ``pyro.param`` sites,
   learned jointly with the variational posterior by ``SVI``. We plot the ELBO trace, the learned scales
   and the posterior predictive band.
2. The prior-collapse failure mode (same 1-D fits): under a mean-field guide, maximising the ELBO over
   the prior scale collapses the posterior onto a shrinking prior (the net explains nothing, the noise
   absorbs all). A full-rank guide, whose KL gap does not grow with the prior scale, avoids it on small
   nets (``guide="mvn"``; ``"lowrank"`` helps partly on bigger ones).
3. sklearn's diabetes data: networks of several widths and depths, compared by their evidence lower
   bound and by held-out log-likelihood.

Run: ``python tutorials/02_bnn_type2.py [out_dir] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pathlib
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_diabetes  # noqa: E402

from bmm_ppl.inference.errors import ConvergenceWarning  # noqa: E402
from bmm_ppl.inference.program.runs import pointwise_log_likelihood  # noqa: E402
from bmm_ppl.inference.svi.engine import SVI  # noqa: E402
from bmm_ppl.models.bnn import BayesianNeuralNetwork  # noqa: E402


def mlp(inputs: int, width: int, depth: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers, size = [], inputs
    for _ in range(depth):
        layers += [torch.nn.Linear(size, width), torch.nn.Tanh()]
        size = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(size, 1))


def heldout_log_likelihood(post, x, y, num_samples: int = 300) -> float:
    """Mean over test points of ``log (1/S) sum_s p(y_i | w_s)``, nats per point."""
    draws = post.samples(num_samples)
    loglik = pointwise_log_likelihood(post.model, (x, y), {}, draws, post.hyperparameters)["obs"]
    return float((torch.logsumexp(loglik, 0) - math.log(num_samples)).mean())


def sine_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, device="cpu") * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 0] + 0.15 * torch.randn(n, generator=g, device="cpu")
    return x, y


def one_d(out_dir: pathlib.Path, steps: int) -> dict:
    # 20 points and 20 hidden units: small enough data for the mean-field collapse to show.
    x, y = sine_data(20, 0)
    x_test, y_test = sine_data(400, 1)
    fits = {}
    for guide in ("normal", "mvn"):
        pyro.set_rng_seed(0)
        model = BayesianNeuralNetwork(mlp(1, 20, 1), prior_scale=None, noise=None)
        fits[guide] = SVI(guide, num_steps=steps, lr=0.02, evidence_particles=500, progress=False).fit(model, x, y)

    def explained_variance(post) -> float:
        """1 - var(y - E[f(x)]) / var(y): near 0 when the posterior has collapsed onto the prior."""
        mean_function = post.model.network(post.samples(500), x).mean(0).squeeze(-1)
        return 1 - float((y - mean_function).var() / y.var())

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for guide, post in fits.items():
        axes[0].plot(post.loss_trace.cpu(), lw=0.5, label=f"{guide} guide")
    axes[0].set(title="-ELBO per step", xlabel="step", ylabel="-ELBO (nats, symlog scale)", yscale="symlog")
    axes[0].legend()
    names = [n for n in fits["mvn"].hyperparameters]
    for offset, (guide, post) in zip((-0.2, 0.2), fits.items()):
        values = [float(post.hyperparameters[n]) for n in names]
        axes[1].bar([i + offset for i in range(len(names))], values, width=0.4, label=f"{guide} guide")
    axes[1].set_xticks(range(len(names)), [n.replace("net.", "") for n in names], rotation=20)
    axes[1].set(title="type-II hyperparameters (prior scales, noise sd)", ylabel="learned value")
    axes[1].legend()
    grid = torch.linspace(-2.5, 2.5, 200, device="cpu").unsqueeze(-1)
    for guide, post in fits.items():
        draws = post.predict(grid, num_samples=500)["obs"]
        low, mid, high = (draws.quantile(q, dim=0) for q in (0.05, 0.5, 0.95))
        axes[2].fill_between(grid[:, 0], low, high, alpha=0.25, label=f"90% band, {guide}")
        axes[2].plot(grid[:, 0], mid, lw=1)
    axes[2].scatter(x[:, 0], y, s=8, c="k", label="data")
    axes[2].set(title="posterior predictive", xlabel="x", ylabel="y")
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bands, not over them
    fig.tight_layout()
    path = out_dir / "02_bnn_1d.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {
        "figure": path,
        **{
            guide: {
                "elbo": post.log_evidence.value,
                "heldout": heldout_log_likelihood(post, x_test, y_test),
                "explained_variance": explained_variance(post),
                "hyperparameters": {n: float(v) for n, v in post.hyperparameters.items()},
            }
            for guide, post in fits.items()
        },
    }


def diabetes(out_dir: pathlib.Path, architectures: list[tuple[int, int]], steps: int) -> dict:
    features, targets = load_diabetes(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32, device="cpu")
    y = torch.tensor(targets, dtype=torch.float32, device="cpu")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0), device="cpu")
    train, test = order[: int(0.8 * len(y))], order[int(0.8 * len(y)) :]
    mean, sd = x[train].mean(0), x[train].std(0)
    x = (x - mean) / sd
    y = (y - y[train].mean()) / y[train].std()
    rows = []
    for width, depth in architectures:
        pyro.set_rng_seed(0)
        model = BayesianNeuralNetwork(mlp(x.shape[1], width, depth), prior_scale=None, noise=None)
        post = SVI("normal", num_steps=steps, lr=0.02, evidence_particles=500, progress=False).fit(model, x[train], y[train])
        rows.append({
            "width": width,
            "depth": depth,
            "elbo": post.log_evidence.value,
            "elbo_stderr": post.log_evidence.stderr,
            "heldout": heldout_log_likelihood(post, x[test], y[test]),
            "hyperparameters": {n: float(v) for n, v in post.hyperparameters.items()},
        })
    fig, ax = plt.subplots(figsize=(5, 4))
    for row in rows:
        ax.errorbar(row["elbo"], row["heldout"], xerr=2 * row["elbo_stderr"], fmt="o")
        ax.annotate(f"{row['width']}x{row['depth']}", (row["elbo"], row["heldout"]), fontsize=8)
    ax.set(xlabel="ELBO (nats, training set; bars: 2 standard errors)", ylabel="held-out log-likelihood (nats / point)",
           title="diabetes: networks by ELBO and held-out fit")
    ax.margins(0.2)  # keeps the points and their labels off the frame
    fig.tight_layout()
    path = out_dir / "02_bnn_diabetes.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"figure": path, "rows": rows}


def main(out_dir, quick: bool = False) -> dict:
    """Runs the tutorial, saves its figures into ``out_dir`` and returns what it measured."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    architectures = [(8, 1), (32, 1)] if quick else [(8, 1), (32, 1), (32, 2), (128, 1)]
    # Quick mode's 150-200 SVI steps are a smoke test, far short of convergence: SVI says so with a
    # ConvergenceWarning, which quick mode records and prints (with what it means) below. The full run
    # lets any such warning through as it is.
    recorder = warnings.catch_warnings(record=True) if quick else contextlib.nullcontext([])
    with recorder as caught:
        if quick:
            warnings.simplefilter("always", ConvergenceWarning)
        results = {
            "one_d": one_d(out_dir, steps=200 if quick else 2000),
            "diabetes": diabetes(out_dir, architectures, steps=150 if quick else 3000),
        }
    for record in caught:
        if not issubclass(record.category, ConvergenceWarning):
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
    results["svi_not_converged"] = [str(r.message) for r in caught if issubclass(r.category, ConvergenceWarning)]
    for message in results["svi_not_converged"]:
        print(f"quick mode, SVI not converged (expected at 150-200 steps; the ELBOs are not final): {message}")
    results["figures"] = [results["one_d"]["figure"], results["diabetes"]["figure"]]
    report(results)
    return results


def report(measured: dict) -> None:
    """Prints what the run measured."""
    for guide in ("normal", "mvn"):
        r = measured["one_d"][guide]
        print(
            f"1-D, {guide:6s} guide: ELBO {r['elbo']:8.2f}  held-out {r['heldout']:6.3f}  "
            f"explained variance {r['explained_variance']:.2f}  {r['hyperparameters']}"
        )
    for row in measured["diabetes"]["rows"]:
        print(
            f"diabetes {row['width']:4d} x {row['depth']}: ELBO {row['elbo']:9.2f} ± {row['elbo_stderr']:.2f}  "
            f"held-out {row['heldout']:6.3f}  noise {row['hyperparameters']['noise']:.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="tutorial_output/02", help="folder for the figures")
    parser.add_argument("--quick", action="store_true", help="small settings (what the tests and the docs run)")
    options = parser.parse_args()
    main(options.out_dir, quick=options.quick)
