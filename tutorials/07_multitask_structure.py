"""Tutorial 07: learning how tasks are related, from the evidence.

Tasks that share structure should share statistical strength, but by how much, and which tasks?
Here the answer is a prior over the task weight matrix whose hyperparameters the evidence learns:

1. Synthetic tasks in two clusters: four structures (independent, shared, hierarchical, learned task
   relation) ranked by exact evidence; the learned task correlation against the true one
   (``synthetic_task_relation.png``).
2. Test error per task against the number of examples per task, independent vs hierarchical vs related
   (``error_vs_examples.png``). What it shows is a limit of type-II learning, not the textbook story:
   with 2-5 examples per task the evidence is maximised over about as many hyperparameters as there are
   observations (hierarchical: a mean and a 3x3 covariance; related: an 8x8 task covariance), the
   learned prior overfits (the optimum is ill-conditioned, which the Exact engine reports with a
   ConvergenceWarning that we count and print), and sharing does not reliably beat independent tasks
   (the tutorial prints the paired difference and its standard error over seeds at the smallest size).
   Measured over the full run's 10 seeds, test MSE at 2 / 3 / 5 examples per task: independent
   2.31 / 1.07 / 0.26, hierarchical 2.31 / 0.96 / 0.36, related 2.74 / 1.37 / 0.27 — no structure wins
   consistently; by 10-40 examples all three agree and reach the noise floor (0.09 plus estimation error).
   The related prior still warns there, for another reason the tutorial prints: with two clusters of
   tasks the evidence-maximising task covariance is nearly rank 2, and its small eigenvalues run to 0
   (a boundary optimum, reported by the engine; the predictions are unaffected). Integrating the task covariance
   under a hyperprior (NUTS) instead of fitting it is the remedy this tutorial does not attempt.
3. A real split: Grunfeld's investment data (statsmodels), one task per firm — which firms invest
   alike? (``grunfeld_firm_relation.png``). The type-II evidence ranks the learned firm relation first,
   yet its test error is the largest (all four are within 4%, less than two paired standard errors):
   the type-II evidence charges nothing for the 79 hyperparameters it fitted to 110 observations. A
   rough BIC-style charge of ``½ log n`` per hyperparameter, printed beside it, restores the test-error
   order.

Run: ``python tutorials/07_multitask_structure.py [out_dir] [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import warnings

import torch

from bmm_ppl.inference import ConvergenceWarning, Exact
from bmm_ppl.models import (
    HierarchicalTasks,
    IdentityFeatures,
    IndependentTasks,
    MultiTaskRegression,
    RelatedTasks,
    SharedTask,
    task_correlation,
)
from bmm_ppl.selection import compare

F64 = torch.float64
NO_BIAS = IdentityFeatures(bias=False)


def structures(num_tasks, features=NO_BIAS):
    return {
        "independent": MultiTaskRegression(IndependentTasks(), num_tasks, features),
        "shared": MultiTaskRegression(SharedTask(), num_tasks, features),
        "hierarchical": MultiTaskRegression(HierarchicalTasks(), num_tasks, features),
        "related": MultiTaskRegression(RelatedTasks(), num_tasks, features),
    }


def two_clusters(num_tasks, within=0.9):
    labels = torch.arange(num_tasks) < num_tasks // 2
    same = (labels.unsqueeze(0) == labels.unsqueeze(1)).to(F64)
    return same * within + torch.eye(num_tasks, dtype=F64) * (1 - within)


def synthetic_tasks(seed, per_task, num_tasks=8, num_features=3, noise=0.3, test_per_task=50):
    g = torch.Generator().manual_seed(seed)
    weights = torch.linalg.cholesky(two_clusters(num_tasks)) @ torch.randn(num_tasks, num_features, generator=g, dtype=F64)

    def draw(m):
        x = torch.randn(num_tasks * m, num_features, generator=g, dtype=F64)
        task = torch.arange(num_tasks).repeat_interleave(m)
        return x, task, (x * weights[task]).sum(-1) + noise * torch.randn(len(task), generator=g, dtype=F64)

    return draw(per_task), draw(test_per_task)


def squared_errors(posterior, x, task, y):
    model = posterior.model
    weights = model.structure.task_weights(posterior.latent_distribution.mean["W"], model.num_tasks, x.shape[1])
    return ((x * weights[task]).sum(-1) - y).pow(2)


def test_mse(posterior, x, task, y):
    return float(squared_errors(posterior, x, task, y).mean())


def num_hyperparameters(posterior) -> int:
    """Free type-II hyperparameters: a symmetric (covariance) matrix counts its upper triangle."""
    count = 0
    for value in posterior.hyperparameters.values():
        value = torch.as_tensor(value)
        square = value.dim() == 2 and value.shape[0] == value.shape[1]
        count += value.shape[0] * (value.shape[0] + 1) // 2 if square else value.numel()
    return count


class TypeIIWarnings:
    """Records the Exact engine's ConvergenceWarnings (ill-conditioned type-II optima) so that the
    tutorial can count and explain them instead of letting them scroll by."""

    def __enter__(self):
        self._context = warnings.catch_warnings(record=True)
        self.records = self._context.__enter__()
        warnings.simplefilter("always", ConvergenceWarning)
        return self

    def __exit__(self, *exc):
        self._context.__exit__(*exc)
        others = [r for r in self.records if not issubclass(r.category, ConvergenceWarning)]
        for record in others:  # anything else is passed on untouched
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
        self.records = [r for r in self.records if issubclass(r.category, ConvergenceWarning)]
        return False


def heatmap(ax, matrix, title, labels=None):
    image = ax.imshow(matrix.detach().cpu().numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_title(title, fontsize=9)
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    return image


def synthetic_section(out, quick):
    import matplotlib.pyplot as plt

    (x, task, y), _ = synthetic_tasks(0, per_task=10)
    with TypeIIWarnings() as caught:
        cmp = compare(structures(8), Exact(), x, task, y)
    if caught.records:
        print(f"({len(caught.records)} type-II fits stopped at an ill-conditioned optimum; see section 2)")
    print("Synthetic tasks, two clusters of four:")
    print(cmp.table[["log_evidence", "probability"]].to_string(float_format=lambda v: f"{v:.4g}"))
    learned = task_correlation(cmp.posteriors["related"].hyperparameters["task_covariance"])
    true = two_clusters(8)
    off = ~torch.eye(8, dtype=torch.bool)
    agreement = float(torch.corrcoef(torch.stack([learned[off], true[off]]))[0, 1])
    print(f"Correlation between learned and true off-diagonal task correlations: {agreement:.3f}")
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.3), layout="constrained")
    heatmap(axes[0], true, "true task correlation")
    image = heatmap(axes[1], learned, "learned (type-II, exact evidence)")
    for ax in axes:
        ax.set_xlabel("task")
    axes[0].set_ylabel("task")
    fig.colorbar(image, ax=axes, shrink=0.8, label="correlation")
    fig.savefig(out / "synthetic_task_relation.png", dpi=120)
    plt.close(fig)

    sizes = [2, 40] if quick else [2, 3, 5, 10, 20, 40]
    seeds = range(2) if quick else range(10)
    curves = {"independent": [], "hierarchical": [], "related": []}
    ill_conditioned = {name: [] for name in curves}  # type-II fits per size that reported ConvergenceWarning
    per_seed = {name: [] for name in curves}  # Tensor[seeds] of test MSEs per size
    for m in sizes:
        values = {name: [] for name in curves}
        flagged = {name: 0 for name in curves}
        for seed in seeds:
            (x, task, y), (x_test, task_test, y_test) = synthetic_tasks(seed + 1, per_task=m)
            for name in curves:
                with TypeIIWarnings() as caught:
                    post = Exact().fit(structures(8)[name], x, task, y)
                flagged[name] += bool(caught.records)
                values[name].append(test_mse(post, x_test, task_test, y_test))
                if name == "related" and m == sizes[-1]:
                    related_spectrum = torch.linalg.eigvalsh(post.hyperparameters["task_covariance"]).flip(0)
        for name in curves:
            per_seed[name].append(torch.tensor(values[name], dtype=F64))
            curves[name].append(float(per_seed[name][-1].mean()))
            ill_conditioned[name].append(flagged[name])
    print(f"Test MSE per task (mean over {len(seeds)} seeds; noise variance 0.09), and how many of the "
          f"{len(seeds)} type-II fits ended at an ill-conditioned optimum (Exact's ConvergenceWarning):")
    for i, m in enumerate(sizes):
        row = "  ".join(f"{name} {curves[name][i]:.3f} ({ill_conditioned[name][i]})" for name in curves)
        print(f"  {m:3d} per task: {row}")
    # The verdict at the smallest size comes from the numbers: the mean paired difference to independent
    # tasks over the seeds, against its standard error.
    verdicts = {}
    for name in ("hierarchical", "related"):
        diff = per_seed["independent"][0] - per_seed[name][0]  # > 0: sharing helped
        se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("inf")
        mean = float(diff.mean())
        verdicts[name] = "helps" if mean > 2 * se else ("hurts" if mean < -2 * se else "makes no clear difference")
        print(f"At {sizes[0]} examples per task, {name} sharing {verdicts[name]}: independent minus {name} test MSE "
              f"{mean:.3f} +- {se:.3f} (paired over {len(diff)} seeds).")
    print("Type-II fits the hierarchical prior's mean and 3x3 covariance, and the related prior's 8x8 task\n"
          "covariance, to the same few observations: at 2-5 examples per task the learned prior is overfitted\n"
          "(and its evidence optimum ill-conditioned, counts in parentheses), which is why sharing does not\n"
          "reliably beat independent tasks where the textbook says it should. By 20-40 examples every structure\n"
          "reaches the noise floor.")
    print(f"The related prior's warnings at {sizes[-1]} examples per task have another cause: the tasks come in two\n"
          f"clusters, so the evidence-maximising 8x8 task covariance is close to rank 2 and its smallest eigenvalues\n"
          f"run to 0, a boundary the engine reports (last seed's eigenvalues: "
          f"{', '.join(f'{v:.2g}' for v in related_spectrum.tolist())}). Predictions do not suffer: the test MSE\n"
          f"is at the noise floor.")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, values in curves.items():
        ax.plot(sizes, values, "o-", label=name)
    ax.axhline(0.09, color="grey", ls=":", label="noise variance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(m) for m in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training examples per task")
    ax.set_ylabel("test mean squared error")
    ax.set_title(f"Type-II sharing vs independent tasks (mean of {len(seeds)} seeds)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "error_vs_examples.png", dpi=120)
    plt.close(fig)
    return {"synthetic_best": cmp.best, "relation_agreement": agreement, "sizes": sizes, "curves": curves,
            "ill_conditioned_fits": ill_conditioned, "small_data_verdicts": verdicts}


def grunfeld_tasks(train_years: int, seed: int = 0):
    """One task per firm: ``invest ~ value + capital``; ``train_years`` random years per firm for
    training (standardised with their own mean and sd), the other years for testing."""
    import statsmodels.datasets.grunfeld as grunfeld

    data = grunfeld.load_pandas().data
    firms = list(dict.fromkeys(data["firm"]))
    g = torch.Generator().manual_seed(seed)
    train, test = ([], [], []), ([], [], [])
    for k, firm in enumerate(firms):
        rows = data[data["firm"] == firm].sort_values("year")
        inputs = torch.tensor(rows[["value", "capital"]].to_numpy(), dtype=F64)
        target = torch.tensor(rows["invest"].to_numpy(), dtype=F64)
        order = torch.randperm(len(target), generator=g)
        fit, held_out = order[:train_years], order[train_years:]
        # Standardise each firm with its training years, so firms of any size are comparable.
        mean_x, sd_x = inputs[fit].mean(0), inputs[fit].std(0)
        mean_y, sd_y = target[fit].mean(), target[fit].std()
        inputs, target = (inputs - mean_x) / sd_x, (target - mean_y) / sd_y
        for split, index in ((train, fit), (test, held_out)):
            split[0].append(inputs[index])
            split[1].append(torch.full((len(index),), k, dtype=torch.long))
            split[2].append(target[index])
    return firms, tuple(torch.cat(part) for part in train), tuple(torch.cat(part) for part in test)


def grunfeld_section(out):
    import matplotlib.pyplot as plt

    firms, (x, task, y), (x_test, task_test, y_test) = grunfeld_tasks(train_years=10)
    with TypeIIWarnings() as caught:
        cmp = compare(structures(len(firms)), Exact(), x, task, y)
    squared = {name: squared_errors(post, x_test, task_test, y_test) for name, post in cmp.posteriors.items()}
    errors = {name: float(e.mean()) for name, e in squared.items()}
    table = cmp.table[["log_evidence", "probability"]].copy()
    table["hyperparameters"] = [num_hyperparameters(cmp.posteriors[name]) for name in table.index]
    # A rough charge for hyperparameters fitted to the same data (the type-II evidence has none): BIC's.
    table["evidence - k/2 log n"] = table["log_evidence"] - 0.5 * table["hyperparameters"] * math.log(len(y))
    table["test_mse"] = [errors[name] for name in table.index]
    best_test = min(errors, key=errors.get)
    gap = squared[cmp.best] - squared[best_test]
    gap_se = float(gap.std() / math.sqrt(len(gap)))
    print("Grunfeld investment, one task per firm, 10 random years per firm for training, 10 for testing:")
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    print(
        f"The evidence ranks '{cmp.best}' first, but its test MSE is {errors[cmp.best]:.4f} against "
        f"{errors[best_test]:.4f} for '{best_test}': a difference of {float(gap.mean()):.4f} +- {gap_se:.4f} (paired "
        f"standard error over {len(gap)} test years), so the four structures predict the held-out years about\n"
        "equally well. The type-II evidence is the likelihood of the training years at fitted hyperparameters and "
        f"charges nothing for them: '{cmp.best}' fits {table.loc[cmp.best, 'hyperparameters']} to {len(y)} "
        "observations. Charging k/2 log n (BIC) ranks the structures as their test errors do; integrating the\n"
        "hyperparameters under a hyperprior would be the principled version of that charge."
    )
    if caught.records:
        print(f"({len(caught.records)} of these type-II fits ended at an ill-conditioned optimum: "
              f"{'; '.join(str(r.message).split(':')[0] for r in caught.records)})")
    learned = task_correlation(cmp.posteriors["related"].hyperparameters["task_covariance"])
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    image = heatmap(ax, learned, "learned firm correlation (Grunfeld)", labels=firms)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(out / "grunfeld_firm_relation.png", dpi=120)
    plt.close(fig)
    return {"grunfeld_best": cmp.best, "grunfeld_test_mse": errors, "grunfeld_table": table,
            "grunfeld_gap": (float(gap.mean()), gap_se)}


def main(out_dir="tutorial_output/07", quick: bool = False) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = synthetic_section(out, quick)
    results.update(grunfeld_section(out))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="tutorial_output/07", help="folder for the figures")
    parser.add_argument("--quick", action="store_true", help="small settings (what the tests and the docs run)")
    options = parser.parse_args()
    main(options.out_dir, quick=options.quick)
