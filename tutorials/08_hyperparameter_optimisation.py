"""Tutorial 08: gradient-based hyperparameter optimisation.

Three experiments with one API (``bmm_ppl.selection.bilevel``):

1. **Per-parameter weight decay on sklearn digits.** A small MLP with one weight decay for every one of
   its ~11,000 parameters, tuned on a validation set by hypergradients through unrolled SGD, against
   two single-decay baselines at the same compute budget (counted in gradient-equivalent evaluations):
   one weight decay tuned by the same hypergradient method (same outer steps, inner steps and start),
   and random search over one decay, which at this budget affords only a couple of full trainings (each
   costs as much as the whole hypergradient run's inner steps; outside quick mode it also gets five
   times the budget, for context). Neither baseline is the stronger by construction: the printout
   names whichever reached the lower validation loss (in quick mode, measured: random search's best of
   two trials, 0.102, against 0.125 for the single-decay hypergradient run, whose validation curve is
   still falling at its last outer step), and the per-parameter decays are compared with that one.
2. **Ridge with one penalty** (Bayesian polynomial regression, degree 9, on the ten ``sin(2 pi x)``
   points): the prior precision that minimises the validation NLL of the MAP fit (50 held-out points;
   implicit hypergradient, CG), next to the one that maximises the exact evidence (``Exact``, type-II), and
   both scored on 50 further test points.
3. **Type-II versus hypergradient selection side by side**: both trajectories of the prior precision,
   drawn on the evidence and validation-NLL curves.

Run: ``python tutorials/08_hyperparameter_optimisation.py [out_dir] [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import torch

from bmm_ppl.datasets import load_sinusoidal
from bmm_ppl.inference import Exact
from bmm_ppl.inference.exact import isotropic_prior as linear_gaussian
from bmm_ppl.models import BayesianLinearRegression, polynomial_features
from bmm_ppl.selection.bilevel import (
    BilevelProblem,
    FunctionalAdam,
    HyperparameterOptimiser,
    Implicit,
    Unrolled,
    per_parameter_weight_decay,
)

DTYPE = torch.float64
NOISE_PRECISION = 11.1  # Bishop's beta for these data (noise sd 0.3)


# ----------------------------------------------------------------------------- 1. digits, per parameter
def digits_data(num_train: int, num_validation: int, seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    train = slice(0, num_train)
    validation = slice(num_train, num_train + num_validation)
    test = slice(num_train + num_validation, None)
    return (x[train], y[train]), (x[validation], y[validation]), (x[test], y[test])


def make_network(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))


def digits_problem(network, train, validation, log_decays, single: bool = False):
    """The bilevel problem; ``single=True``: ``log_decays = {"log_decay": scalar}``, one decay for all."""

    def forward(params, x):
        return torch.func.functional_call(network, params, (x,))

    def inner(params, hypers):
        loss = torch.nn.functional.cross_entropy(forward(params, train[0]), train[1])
        decays = {name: hypers["log_decay"] for name in params} if single else hypers
        return loss + per_parameter_weight_decay(params, decays)

    def outer(params, hypers):
        return torch.nn.functional.cross_entropy(forward(params, validation[0]), validation[1])

    return BilevelProblem.from_module(network, inner, outer, log_decays), forward


def evaluate(forward, params, data) -> tuple[float, float]:
    with torch.no_grad():
        logits = forward(params, data[0])
        loss = float(torch.nn.functional.cross_entropy(logits, data[1]))
        accuracy = float((logits.argmax(-1) == data[1]).double().mean())
    return loss, accuracy


def per_parameter_weight_decay_experiment(quick: bool, seed: int = 0) -> dict:
    """Hypergradient-tuned per-parameter decay against random search over one decay, equal budget."""
    hidden = 150  # 64*150 + 150 + 150*10 + 10 = 11,260 parameters, each with its own weight decay
    train, validation, test = digits_data(num_train=300, num_validation=300, seed=seed)
    outer_steps = 12 if quick else 40
    unrolled = Unrolled(num_steps=10, lr=0.3, momentum=0.9, truncate=5)
    training_steps = outer_steps * unrolled.num_steps  # inner SGD steps the tuned network gets

    network = make_network(hidden, seed)
    initial_decay = 1e-3
    log_decays = {name: torch.full_like(p, math.log(initial_decay)) for name, p in network.named_parameters()}
    problem, forward = digits_problem(network, train, validation, log_decays)
    num_hyperparameters = sum(v.numel() for v in log_decays.values())
    start = time.perf_counter()
    result = HyperparameterOptimiser(unrolled, num_steps=outer_steps, lr=0.2, progress=False).fit(problem)
    tuned_seconds = time.perf_counter() - start
    # Budget in gradient-equivalent evaluations: each outer step runs num_steps inner gradients forward and
    # backpropagates through `truncate` of them (about two gradient-equivalents each: a Hessian-vector
    # product and a mixed product), plus the validation gradient; the final `train` adds num_steps more.
    budget = outer_steps * (unrolled.num_steps + 2 * unrolled.truncate + 1) + unrolled.num_steps
    tuned_val = evaluate(forward, result.params, validation)
    tuned_test = evaluate(forward, result.params, test)

    # The baseline a user of this API tries first: ONE decay, tuned by the same hypergradient method, with
    # the same outer steps, inner steps and initialisation, hence exactly the same budget.
    single_problem, _ = digits_problem(
        make_network(hidden, seed), train, validation, {"log_decay": torch.tensor(math.log(initial_decay))}, single=True
    )
    single_result = HyperparameterOptimiser(unrolled, num_steps=outer_steps, lr=0.2, progress=False).fit(single_problem)
    single_val = evaluate(forward, single_result.params, validation)
    single_test = evaluate(forward, single_result.params, test)

    # Random search: each trial trains the same network from the same initialisation for the same number
    # of SGD steps (with one weight decay for all parameters), then evaluates on validation (1 gradient-equivalent).
    trial_cost = training_steps + 1
    num_trials = max(1, budget // trial_cost)
    # Outside quick mode random search also gets five times the budget, for context.
    num_reference_trials = num_trials if quick else 5 * num_trials
    generator = torch.Generator().manual_seed(seed + 1)
    trials = []
    start = time.perf_counter()
    for _ in range(num_reference_trials):
        log10_decay = -6 + 5 * torch.rand((), generator=generator)  # log-uniform on [1e-6, 1e-1]
        decay = {n: torch.full_like(p, float(log10_decay) * math.log(10)) for n, p in network.named_parameters()}
        single, _ = digits_problem(network, train, validation, decay)
        trained = Unrolled(num_steps=training_steps, lr=unrolled.lr, momentum=unrolled.momentum).train(
            single, dict(single.params), single.hyperparameters
        )
        trials.append((evaluate(forward, trained, validation), evaluate(forward, trained, test), 10 ** float(log10_decay)))
    search_seconds = time.perf_counter() - start
    best_val, best_test, best_decay = min(trials[:num_trials], key=lambda t: t[0][0])
    reference_val, reference_test, reference_decay = min(trials, key=lambda t: t[0][0])
    decays = torch.cat([result.hyperparameters[n].reshape(-1) for n in result.hyperparameters]).exp()
    return {
        "num_hyperparameters": num_hyperparameters,
        "budget_gradient_evaluations": budget,
        "random_search_trials": num_trials,
        "random_search_cost": num_trials * trial_cost,
        "tuned_seconds": tuned_seconds,
        "random_search_seconds": search_seconds,  # all trials, the five-budget reference included
        "per_parameter_validation_loss": tuned_val[0],
        "per_parameter_test_loss": tuned_test[0],
        "per_parameter_test_accuracy": tuned_test[1],
        "hypergradient_single_decay": float(single_result.hyperparameters["log_decay"].exp()),
        "hypergradient_single_validation_loss": single_val[0],
        "hypergradient_single_test_loss": single_test[0],
        "hypergradient_single_test_accuracy": single_test[1],
        "hypergradient_single_outer_trace": single_result.outer_trace,
        "single_decay": best_decay,
        "single_decay_validation_loss": best_val[0],
        "single_decay_test_loss": best_test[0],
        "single_decay_test_accuracy": best_test[1],
        "five_budget_trials": num_reference_trials,
        "five_budget_single_decay": reference_decay,
        "five_budget_validation_loss": reference_val[0],
        "five_budget_test_loss": reference_test[0],
        "five_budget_test_accuracy": reference_test[1],
        "outer_trace": result.outer_trace,
        "decays": decays,
        "trial_losses": [(t[2], t[0][0]) for t in trials],
    }


# ------------------------------------------------------------------- 2 and 3. ridge: evidence vs validation
def ridge_experiment(quick: bool, degree: int = 9) -> dict:
    """The prior precision alpha of a degree-9 Bayesian polynomial (beta fixed): type-II (exact evidence)
    against the hypergradient of the validation NLL at the MAP (a ridge penalty lambda = alpha / beta)."""
    features = polynomial_features(degree)
    x, t = load_sinusoidal("train")
    x_held, t_held = load_sinusoidal("test")
    # Half of the 100 held-out points validate (the hypergradient's objective), half test both choices.
    x_val, t_val, x_test, t_test = x_held[:50], t_held[:50], x_held[50:], t_held[50:]
    model = BayesianLinearRegression(features, alpha=None, beta=NOISE_PRECISION)

    # Type-II: Exact's evidence optimum, and an Adam trajectory on the exact evidence for the plot.
    exact = Exact().fit(model, x, t)
    alpha_evidence = float(exact.hyperparameters["alpha"])
    data = linear_gaussian.spectral_data(features(x), t)
    beta = torch.tensor(NOISE_PRECISION, dtype=DTYPE)
    log_alpha = {"alpha": torch.tensor(0.0, dtype=DTYPE)}
    adam = FunctionalAdam(lr=0.2)
    state = adam.init(log_alpha)
    evidence_steps = 60 if quick else 200
    type2_path = [float(log_alpha["alpha"].exp())]
    for _ in range(evidence_steps):
        g = torch.func.grad(lambda h: -linear_gaussian.log_evidence(data, h["alpha"].exp(), beta))(log_alpha)
        log_alpha, state = adam.step(log_alpha, g, state)
        type2_path.append(float(log_alpha["alpha"].exp()))

    # Hypergradient: validation NLL of the MAP, implicit function theorem with CG. Degree-9 polynomial
    # features are too ill-conditioned for a few SGD steps to reach the MAP, so the inner problem is
    # solved exactly (a linear solve) through `inner_solver`.
    problem = BilevelProblem.from_pyro(model, (x, t), (x_val, t_val))
    problem.hyperparameters = {"alpha": torch.tensor(0.0, dtype=DTYPE)}  # log alpha = 0, as type-II starts

    def exact_map(problem, params, hypers):
        return {"w": _map_weights(problem.constrain(hypers)["alpha"], features, x, t)}

    method = Implicit(method="cg", num_iterations=20, inner_solver=exact_map)
    result = HyperparameterOptimiser(method, num_steps=150, lr=0.2, progress=False).fit(problem)
    hypergradient_path = result.trajectory["alpha"].tolist()
    alpha_validation = float(result.hyperparameters["alpha"])

    # Curves for the plot and a fine grid check of the validation optimum.
    grid = torch.logspace(-8, 3, 551 if quick else 2201, dtype=DTYPE)
    evidence_curve = torch.stack([linear_gaussian.log_evidence(data, a, beta) for a in grid])
    validation_curve = torch.stack([_validation_nll(a, features, x, t, x_val, t_val) for a in grid])
    grid_alpha = float(grid[validation_curve.argmin()])
    return {
        "alpha_evidence": alpha_evidence,
        "alpha_evidence_adam": type2_path[-1],
        "alpha_validation": alpha_validation,
        "alpha_validation_grid": grid_alpha,
        "ridge_penalty_evidence": alpha_evidence / NOISE_PRECISION,
        "ridge_penalty_validation": alpha_validation / NOISE_PRECISION,
        "type2_path": type2_path,
        "hypergradient_path": hypergradient_path,
        "grid": grid,
        "evidence_curve": evidence_curve,
        "validation_curve": validation_curve,
        "test_nll_at_evidence_optimum": float(_validation_nll(torch.tensor(alpha_evidence, dtype=DTYPE), features, x, t, x_test, t_test)),
        "test_nll_at_validation_optimum": float(_validation_nll(torch.tensor(alpha_validation, dtype=DTYPE), features, x, t, x_test, t_test)),
    }


def _map_weights(alpha, features, x, t):
    design = features(x)
    precision = NOISE_PRECISION * design.T @ design + alpha * torch.eye(design.shape[1], dtype=DTYPE)
    return torch.linalg.solve(precision, NOISE_PRECISION * design.T @ t)


def _validation_nll(alpha, features, x, t, x_val, t_val):
    w = _map_weights(alpha, features, x, t)
    return -torch.distributions.Normal(features(x_val) @ w, NOISE_PRECISION**-0.5).log_prob(t_val).sum()


# ------------------------------------------------------------------------------------------------ plots
def plot_digits(digits: dict, path):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(digits["outer_trace"].numpy(), "o-", label="per-parameter decays (hypergradient)")
    left.plot(digits["hypergradient_single_outer_trace"].numpy(), "s-", color="tab:green",
              label="one decay (hypergradient, same budget)")
    left.axhline(digits["single_decay_validation_loss"], color="tab:red", ls="--",
                 label=f"one decay, random search (same budget: {digits['random_search_trials']} trials)")
    if digits["five_budget_trials"] > digits["random_search_trials"]:
        left.axhline(digits["five_budget_validation_loss"], color="tab:purple", ls=":",
                     label=f"one decay, random search (5x budget: {digits['five_budget_trials']} trials)")
    left.set_xlabel("outer step")
    left.set_ylabel("validation cross-entropy")
    left.set_title(f"{digits['num_hyperparameters']:,} hyperparameters, budget {digits['budget_gradient_evaluations']} grads")
    left.legend(fontsize=7)
    right.hist(digits["decays"].log10().numpy(), bins=50)
    right.set_xlabel("log10 weight decay (per parameter)")
    right.set_ylabel("parameters")
    right.set_title("Tuned weight decays")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ridge(ridge: dict, path):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4))
    grid = ridge["grid"].numpy()
    left.semilogx(grid, ridge["evidence_curve"].numpy(), color="tab:blue", label="log evidence (train)")
    left.axvline(ridge["alpha_evidence"], color="tab:blue", ls=":", label=f"type-II alpha = {ridge['alpha_evidence']:.3g}")
    left.set_xlabel("prior precision alpha")
    left.set_ylabel("log evidence", color="tab:blue")
    twin = left.twinx()
    twin.semilogx(grid, ridge["validation_curve"].numpy(), color="tab:red", label="validation NLL")
    twin.axvline(ridge["alpha_validation"], color="tab:red", ls=":", label=f"hypergradient alpha = {ridge['alpha_validation']:.3g}")
    twin.set_ylabel("validation NLL at the MAP", color="tab:red")
    twin.set_ylim(top=float(ridge["validation_curve"].min()) + 200)
    # One legend for both axes, below them: inside, it would cover the curves.
    handles, labels = left.get_legend_handles_labels()
    more_handles, more_labels = twin.get_legend_handles_labels()
    left.legend(handles + more_handles, labels + more_labels, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, fontsize=7)
    left.set_title("Degree-9 polynomial: two criteria for alpha")
    right.semilogy(ridge["type2_path"], label="type-II: Adam on the exact evidence")
    right.semilogy(ridge["hypergradient_path"], label="hypergradient: Adam on validation NLL")
    right.axhline(ridge["alpha_evidence"], color="tab:blue", ls=":", lw=1)
    right.axhline(ridge["alpha_validation"], color="tab:orange", ls=":", lw=1)
    right.set_xlabel("step")
    right.set_ylabel("alpha")
    right.set_title("Trajectories")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out_dir="tutorial_08_output", quick: bool = False) -> dict:
    """Runs the three experiments, saves ``digits_weight_decay.png`` and ``ridge_evidence_vs_validation.png``
    into ``out_dir`` and returns the numbers measured."""
    import matplotlib

    matplotlib.use("Agg")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = per_parameter_weight_decay_experiment(quick)
    ridge = ridge_experiment(quick)
    plot_digits(digits, out / "digits_weight_decay.png")
    plot_ridge(ridge, out / "ridge_evidence_vs_validation.png")
    print(
        f"Digits: {digits['num_hyperparameters']:,} per-parameter decays -> validation loss "
        f"{digits['per_parameter_validation_loss']:.4f} (test {digits['per_parameter_test_loss']:.4f}, "
        f"accuracy {digits['per_parameter_test_accuracy']:.3f}); one decay by hypergradient "
        f"{digits['hypergradient_single_decay']:.2g} -> {digits['hypergradient_single_validation_loss']:.4f} (test "
        f"{digits['hypergradient_single_test_loss']:.4f}, accuracy {digits['hypergradient_single_test_accuracy']:.3f}); "
        f"best single decay {digits['single_decay']:.2g} from "
        f"{digits['random_search_trials']} random trials -> {digits['single_decay_validation_loss']:.4f} "
        f"(test {digits['single_decay_test_loss']:.4f}, accuracy {digits['single_decay_test_accuracy']:.3f}); "
        f"budget {digits['budget_gradient_evaluations']} gradient evaluations each"
    )
    baselines = {"one decay by hypergradient": digits["hypergradient_single_validation_loss"],
                 f"random search ({digits['random_search_trials']} trials)": digits["single_decay_validation_loss"]}
    strongest = min(baselines, key=baselines.get)
    margin = baselines[strongest] - digits["per_parameter_validation_loss"]
    print(f"Strongest single-decay baseline at equal budget: {strongest} (validation {baselines[strongest]:.4f}); "
          f"per-parameter decays are {'better' if margin > 0 else 'worse'} by {abs(margin):.4f} on validation")
    print(
        f"Ridge (degree 9): type-II alpha {ridge['alpha_evidence']:.4g}, hypergradient alpha "
        f"{ridge['alpha_validation']:.4g} (grid {ridge['alpha_validation_grid']:.4g}); test NLL "
        f"{ridge['test_nll_at_evidence_optimum']:.2f} vs {ridge['test_nll_at_validation_optimum']:.2f}"
    )
    return {"digits": digits, "ridge": ridge, "out_dir": out}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="tutorial_output/08", help="folder for the figures")
    parser.add_argument("--quick", action="store_true", help="small settings (what the tests and the docs run)")
    options = parser.parse_args()
    main(options.out_dir, quick=options.quick)
