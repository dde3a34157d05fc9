"""Laplace evidence of a trained network against laplace-torch, side by side in one run.

A tanh MLP (64-H-10) is trained on sklearn's digits (1,437 training images) to the mode of the
regularised cross-entropy (prior precision ``delta``), by our ``Laplace().fit_network`` in ``diag`` form
(L-BFGS to the Newton-decrement test). Then, at that same set of weights, for each Hessian structure
(``full``, ``diag``, ``kron``) we time

- ``bmm_ppl.inference.Laplace(hessian=...).fit_network`` (it checks the mode first: an L-BFGS pass
  that stops at once at a mode, then the curvature and the evidence), and
- ``laplace.Laplace(net, "classification", subset_of_weights="all", hessian_structure=...)``
  ``.fit(loader)`` + ``.log_marginal_likelihood()`` (curvlinops GGN backend, its default),

and print both evidences, their difference, the time ratio (ours / laplace-torch) and each one's peak
memory: every (library, structure) runs once more in a fresh process of its own, which loads the
trained weights and reports how far its peak resident memory rose above what it held before the call
(``VmHWM`` after resetting it, less ``VmRSS`` before; Linux only). ``full`` runs only for ``P <= 6000`` parameters (H = 32: 2,410). Needs the ``[bench]``
extra.

Run: ``python benchmarks/laplace_fit.py [--hidden 32] [--delta 1.0] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from bmm_ppl.inference import ConvergenceWarning, Laplace
from bmm_ppl.testing.peers import import_laplace_torch


def digits(dtype=torch.float64):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=dtype)
    return x[:1437], torch.tensor(y[:1437])


def network(hidden: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)).double()


def timed(call, repeats: int):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def evidence_call(library: str, structure: str, net, x, y, delta: float, laplace_torch):
    """``() -> log evidence`` of one library's post-hoc Laplace at ``net``'s weights."""
    if library == "ours":
        def ours():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                return Laplace(hessian=structure, progress=False).fit_network(
                    net, x, y, likelihood="categorical", prior_precision=delta).log_evidence.value
        return ours
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))

    def peer():
        la = laplace_torch.Laplace(net, "classification", subset_of_weights="all", hessian_structure=structure,
                                   prior_precision=delta)
        la.fit(loader, progress_bar=False)
        return float(la.log_marginal_likelihood().detach())
    return peer


def peak_memory_mb(library: str, structure: str, weights: str, hidden: int, delta: float) -> float:
    """The rise of peak resident memory (MB) of one call, in a fresh process."""
    result = subprocess.run([sys.executable, __file__, "--memory-probe", library, structure, weights,
                             "--hidden", str(hidden), "--delta", str(delta)],
                            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return float(result.stdout.strip().splitlines()[-1])


def memory_probe(library: str, structure: str, weights: str, hidden: int, delta: float) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    laplace_torch = import_laplace_torch()
    x, y = digits()
    net = network(hidden)
    net.load_state_dict(torch.load(weights, weights_only=True))
    call = evidence_call(library, structure, net, x, y, delta, laplace_torch)
    # The peak resident memory a fork inherits from its parent would hide the call's own: reset the
    # high-water mark (Linux: "5" to clear_refs) and measure from the resident memory now.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status_kb("VmRSS")
    call()
    print((_status_kb("VmHWM") - before) / 1024.0)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--delta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-probe", nargs=3, metavar=("LIBRARY", "STRUCTURE", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(*args.memory_probe, args.hidden, args.delta)
    laplace_torch = import_laplace_torch()
    if laplace_torch is None:
        raise SystemExit("laplace-torch is not installed: pip install -e '.[bench]'")
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # laplace-torch makes its prior tensors in the default dtype
    x, y = digits()
    net = network(args.hidden)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trained = Laplace(hessian="diag", max_iter=3000, progress=False).fit_network(
            net, x, y, likelihood="categorical", prior_precision=args.delta)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(trained.latent_distribution.mean[f"net.{name}"])
    size = sum(p.numel() for p in net.parameters())
    print(f"64-{args.hidden}-10 tanh MLP, P = {size}, n = {len(y)}; mode found in {time.perf_counter() - start:.1f} s "
          f"(Newton decrement {trained.diagnostics['newton_decrement']:.2g})")
    weights = tempfile.NamedTemporaryFile(suffix=".pt", delete=False).name
    torch.save(net.state_dict(), weights)
    print(f"{'structure':>9} | {'ours (s)':>9} | {'laplace-torch (s)':>17} | {'ratio':>6} | {'ours (MB)':>9} | "
          f"{'laplace-torch (MB)':>18} | {'evidence (ours)':>15} | difference")
    for structure in ("full", "diag", "kron"):
        if structure == "full" and size > 6000:
            continue
        our_time, our_value = timed(evidence_call("ours", structure, net, x, y, args.delta, laplace_torch), args.repeats)
        peer_time, peer_value = timed(evidence_call("peer", structure, net, x, y, args.delta, laplace_torch), args.repeats)
        our_memory = peak_memory_mb("ours", structure, weights, args.hidden, args.delta)
        peer_memory = peak_memory_mb("peer", structure, weights, args.hidden, args.delta)
        print(f"{structure:>9} | {our_time:9.3f} | {peer_time:17.3f} | {our_time / peer_time:5.2f}x | {our_memory:9.1f} | "
              f"{peer_memory:18.1f} | {our_value:15.4f} | {our_value - peer_value:.2e}")
    os.unlink(weights)


if __name__ == "__main__":
    main()
