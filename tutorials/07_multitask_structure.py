"""Tutorial 07: learning how tasks are related, from the evidence.

Tasks that share structure should share statistical strength, but by how much, and which tasks?
Here the answer is a prior over the task weight matrix whose hyperparameters the evidence learns:

1. Synthetic tasks in two clusters: four structures (independent, shared, hierarchical, learned task
   relation) ranked by exact evidence; the learned task correlation against the true one
   (``synthetic_task_relation.png``).
2. Test error per task against the number of examples per task: hierarchical vs independent
   (``error_vs_examples.png``): sharing helps most when data are scarce, and the gap closes.
3. A real split: Grunfeld's investment data (statsmodels), one task per firm — which firms invest
   alike? (``grunfeld_firm_relation.png``).

Run: ``python tutorials/07_multitask_structure.py [out_dir]``.
"""

from __future__ import annotations

import pathlib
import sys

import torch

from bmm_ppl.inference import Exact
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


def test_mse(posterior, x, task, y):
    model = posterior.model
    weights = model.structure.task_weights(posterior.latent_distribution.mean["W"], model.num_tasks, x.shape[1])
    return float(((x * weights[task]).sum(-1) - y).pow(2).mean())


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
    cmp = compare(structures(8), Exact(), x, task, y)
    print("Synthetic tasks, two clusters of four:")
    print(cmp.table[["log_evidence", "probability"]].to_string(float_format=lambda v: f"{v:.4g}"))
    learned = task_correlation(cmp.posteriors["related"].hyperparameters["task_covariance"])
    true = two_clusters(8)
    off = ~torch.eye(8, dtype=torch.bool)
    agreement = float(torch.corrcoef(torch.stack([learned[off], true[off]]))[0, 1])
    print(f"Correlation between learned and true off-diagonal task correlations: {agreement:.3f}")
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.3))
    heatmap(axes[0], true, "true task correlation")
    image = heatmap(axes[1], learned, "learned (type-II, exact evidence)")
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.savefig(out / "synthetic_task_relation.png", dpi=120)
    plt.close(fig)

    sizes = [2, 40] if quick else [2, 3, 5, 10, 20, 40]
    seeds = range(2) if quick else range(10)
    curves = {"independent": [], "hierarchical": [], "related": []}
    for m in sizes:
        totals = {name: 0.0 for name in curves}
        for seed in seeds:
            (x, task, y), (x_test, task_test, y_test) = synthetic_tasks(seed + 1, per_task=m)
            for name in curves:
                post = Exact().fit(structures(8)[name], x, task, y)
                totals[name] += test_mse(post, x_test, task_test, y_test) / len(seeds)
        for name in curves:
            curves[name].append(totals[name])
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, values in curves.items():
        ax.plot(sizes, values, "o-", label=name)
    ax.axhline(0.09, color="grey", ls=":", label="noise variance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training examples per task")
    ax.set_ylabel("test mean squared error")
    ax.set_title("Sharing helps when data are scarce")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "error_vs_examples.png", dpi=120)
    plt.close(fig)
    return {"synthetic_best": cmp.best, "relation_agreement": agreement, "sizes": sizes, "curves": curves}


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
    cmp = compare(structures(len(firms)), Exact(), x, task, y)
    errors = {name: test_mse(post, x_test, task_test, y_test) for name, post in cmp.posteriors.items()}
    table = cmp.table[["log_evidence", "probability"]].copy()
    table["test_mse"] = [errors[name] for name in table.index]
    print("Grunfeld investment, one task per firm, 10 random years per firm for training, 10 for testing:")
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    learned = task_correlation(cmp.posteriors["related"].hyperparameters["task_covariance"])
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    image = heatmap(ax, learned, "learned firm correlation (Grunfeld)", labels=firms)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(out / "grunfeld_firm_relation.png", dpi=120)
    plt.close(fig)
    return {"grunfeld_best": cmp.best, "grunfeld_test_mse": errors}


def main(out_dir="tutorial_output/07", quick: bool = False) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = synthetic_section(out, quick)
    results.update(grunfeld_section(out))
    return results


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tutorial_output/07")
