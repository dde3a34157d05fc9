"""Cost of ``InvariantKernel`` against the plain GPyTorch kernel it wraps.

For 8x8 digit images (d = 64), times one evaluation of the exact marginal likelihood *with its
gradient* (kernel matrix, Cholesky, backward) through GPyTorch's ``ExactMarginalLogLikelihood``, for:

* the plain ``ScaleKernel(RBFKernel())`` (the peer),
* ``InvariantKernel`` with ``transform=None`` (identity: should cost the same),
* the strict kernel over rotations by multiples of 90° (``|G| = 4``),
* the weak rotation kernel with S quadrature points (``S^2`` base-kernel evaluations per entry,
  plus ``S * n`` bilinear image resamplings).

Prints the minimum wall time over repeats (one thread, to limit noise from other processes) and the ratio to the plain kernel measured in the same run. The
expected ratio is about ``S^2`` (``|G|^2``) once the base kernel dominates.

Run: ``python benchmarks/invariant_kernel_cost.py [--quick]``
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits

from bmm_ppl.models.invariance import AffineImageTransform, InvariantExactGP, InvariantKernel, rot90_group
from bmm_ppl.models.invariance._gpytorch import gpytorch


def timed(kernel, x, y, repeats: int) -> float:
    gp = InvariantExactGP(x, y, gpytorch.kernels.ScaleKernel(kernel)).double()
    gp.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp)
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        gp.zero_grad()
        start = time.perf_counter()
        with gpytorch.settings.max_cholesky_size(10**6):
            (-mll(gp(x), y)).backward()
        times.append(time.perf_counter() - start)
    # the minimum is the least disturbed run on a shared machine
    return min(times[1:])


def main(quick: bool = False) -> list[dict]:
    digits = load_digits()
    sizes = (100,) if quick else (100, 300)
    sample_counts = (4, 8) if quick else (4, 8, 16)
    repeats = 3 if quick else 9
    torch.set_num_threads(1)
    rows = []
    for n in sizes:
        x = torch.tensor(digits.data[:n], dtype=torch.float64) / 16
        y = torch.tensor(digits.target[:n] % 2, dtype=torch.float64) * 2 - 1
        plain = timed(gpytorch.kernels.RBFKernel(), x, y, repeats)
        cases = [("InvariantKernel(identity)", InvariantKernel(gpytorch.kernels.RBFKernel())),
                 ("strict rot90 group, |G|=4", InvariantKernel(gpytorch.kernels.RBFKernel(), rot90_group((8, 8))))]
        cases += [(f"rotation, S={s} quadrature",
                   InvariantKernel(gpytorch.kernels.RBFKernel(), AffineImageTransform((8, 8)), ranges=0.5, num_samples=s))
                  for s in sample_counts]
        rows.append({"n": n, "kernel": "GPyTorch ScaleKernel(RBF) (peer)", "seconds": plain, "ratio": 1.0})
        for name, kernel in cases:
            seconds = timed(kernel, x, y, repeats)
            rows.append({"n": n, "kernel": name, "seconds": seconds, "ratio": seconds / plain})
    print(f"{'n':>5}  {'kernel':36s} {'ms / MLL+grad':>14} {'x plain':>9}")
    for row in rows:
        print(f"{row['n']:>5}  {row['kernel']:36s} {1e3 * row['seconds']:14.2f} {row['ratio']:9.1f}")
    print(f"(float64, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
