"""Tutorial 06: learning how much rotation invariance the data support, through the marginal likelihood.

Data augmentation is usually a hand-set hyperparameter. Here it is a kernel hyperparameter: the GP
kernel averages a base RBF kernel over rotations of both images by angles ``α ~ Uniform[-θ, θ]``
(``InvariantKernel``, van der Wilk et al. 2018), and ``θ`` is learned with the other hyperparameters by
maximising the exact evidence ``log p(y | θ, ...)`` (``GPEvidence``).

Data: sklearn's bundled 8x8 digits, every image rotated by its own random angle in ``[-θ*, θ*]`` with
``θ* = 60°`` (the "rotated copies"). Task: 10-class classification done as GP *regression on one-hot
targets* (10 outputs sharing one kernel; the predicted class is the arg-max of the posterior mean) — the
exact evidence is then available in closed form.

We compare three models, each fitted by type-II maximum evidence:

* no invariance (plain RBF),
* learned invariance (rotation range ``θ`` learned from 0.3 rad),
* full invariance (``θ = π`` fixed: every rotation is equivalent, so a 6 and a 9 look alike).

Run: ``python tutorials/06_learned_invariances.py [out_dir] [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from bmm_ppl.inference.exact.gp_evidence import GPEvidence  # noqa: E402
from bmm_ppl.models.invariance import AffineImageTransform, GPRegression, InvariantKernel  # noqa: E402
from bmm_ppl.models.invariance._gpytorch import gpytorch  # noqa: E402

TRUE_RANGE = math.pi / 3
ROTATION = AffineImageTransform((8, 8), ("rotation",))


def rotated_digits(num_train: int, num_test: int, seed: int = 0):
    """Train and test sets of 8x8 digits in [0, 1], each image rotated by U[-TRUE_RANGE, TRUE_RANGE]."""
    data = load_digits()
    images = torch.tensor(data.data, dtype=torch.float64) / 16.0
    labels = torch.tensor(data.target)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)[: num_train + num_test]
    angles = (torch.rand(len(order), generator=generator, dtype=torch.float64) * 2 - 1) * TRUE_RANGE
    theta = ROTATION.affine_matrices(angles.unsqueeze(-1))
    grid = F.affine_grid(theta, [len(order), 1, 8, 8], align_corners=False)
    moved = F.grid_sample(images[order].reshape(-1, 1, 8, 8), grid, align_corners=False).reshape(-1, 64)
    split = num_train
    return moved[:split], labels[order][:split], moved[split:], labels[order][split:]


def make_model(kind: str, num_samples: int, full_samples: int) -> GPRegression:
    if kind == "none":
        inner = InvariantKernel(gpytorch.kernels.RBFKernel())  # identity transform: exactly the RBF kernel
    elif kind == "learned":
        inner = InvariantKernel(gpytorch.kernels.RBFKernel(), ROTATION, ranges=0.3, num_samples=num_samples)
    else:  # full: every rotation, fixed
        inner = InvariantKernel(gpytorch.kernels.RBFKernel(), ROTATION, ranges=math.pi, learn_ranges=False,
                                num_samples=full_samples)
    inner.base_kernel.lengthscale = 3.0
    return GPRegression(gpytorch.kernels.ScaleKernel(inner), noise_init=0.1)


def main(out_dir, quick: bool = False) -> dict:
    """Fits the three models, saves the figures into ``out_dir``, returns the measured numbers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # Quadrature points over the learned range (S) and over the full circle (full invariance).
    num_train, num_test, num_samples, full_samples, num_steps = (60, 100, 4, 6, 2) if quick else (200, 500, 6, 10, 5)
    x, labels, x_test, labels_test = rotated_digits(num_train, num_test)
    targets = F.one_hot(labels, 10).to(torch.float64)

    engine = GPEvidence(num_steps=num_steps, lr=1.0, optimizer="lbfgs", progress=not quick)
    results = {}
    for kind in ("none", "learned", "full"):
        start = time.perf_counter()
        model = make_model(kind, num_samples, full_samples)
        post = engine.fit(model, x, targets)
        mean, _ = model.predictive(x, targets, x_test, post.hyperparameters)
        accuracy = float((mean.argmax(-1) == labels_test).to(torch.float64).mean())
        results[kind] = {
            "log_evidence": post.log_evidence.value,
            "accuracy": accuracy,
            "range": float(post.hyperparameters["kernel.base_kernel.ranges"]) if kind == "learned"
            else (0.0 if kind == "none" else math.pi),
            "seconds": time.perf_counter() - start,
        }
    learned = results["learned"]["range"]

    # Figure 1: the learned distribution over rotation angles against the data-generating one.
    angles = torch.linspace(-math.pi, math.pi, 721)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for half_width, label, style in ((TRUE_RANGE, "data: U[-60°, 60°]", "--"), (learned, "learned p(α|θ)", "-")):
        density = torch.where(angles.abs() <= half_width, 1 / (2 * half_width), 0.0)
        ax.plot(torch.rad2deg(angles), density, style, label=label)
    ax.set_xlabel("rotation angle α (degrees)")
    ax.set_ylabel("density (per radian)")
    ax.set_title(f"learned rotation range θ = {math.degrees(learned):.0f}°")
    # Headroom above the densities, so that the legend sits over empty space, not over the curves.
    ax.set_ylim(0, 1.45 / (2 * min(TRUE_RANGE, learned)))
    ax.legend(loc="upper right", ncol=2, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "learned_angle_distribution.png", dpi=100)
    plt.close(fig)

    # Figure 2: evidence and test accuracy of no / learned / full invariance.
    kinds = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.bar(kinds, [results[k]["log_evidence"] for k in kinds], color=["grey", "tab:blue", "tab:orange"])
    left.set_ylabel("exact log evidence (nats, total)")
    right.bar(kinds, [results[k]["accuracy"] for k in kinds], color=["grey", "tab:blue", "tab:orange"])
    right.set_ylabel(f"test accuracy ({num_test} rotated digits)")
    right.set_ylim(0, 1)
    fig.suptitle(f"{num_train} rotated training digits, one-hot GP regression")
    fig.tight_layout()
    fig.savefig(out_dir / "evidence_and_accuracy.png", dpi=100)
    plt.close(fig)

    figures = [str(out_dir / "learned_angle_distribution.png"), str(out_dir / "evidence_and_accuracy.png")]
    output = {"true_range": TRUE_RANGE, "learned_range": learned, "results": results, "figures": figures,
              "num_train": num_train, "num_test": num_test}
    report(output)
    return output


def report(output: dict) -> None:
    """Prints what the run measured."""
    print(f"true range {math.degrees(output['true_range']):.1f}°, learned {math.degrees(output['learned_range']):.1f}°")
    for name, row in output["results"].items():
        print(f"{name:8s} log evidence {row['log_evidence']:10.2f}  accuracy {row['accuracy']:.3f}  ({row['seconds']:.1f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="tutorial_output/06", help="folder for the figures")
    parser.add_argument("--quick", action="store_true", help="small settings (what the tests and the docs run)")
    options = parser.parse_args()
    main(options.out_dir, quick=options.quick)
