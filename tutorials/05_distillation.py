"""Tutorial 05: distilling Bayesian predictions into one small network (sklearn's digits).

Bayesian predictions average S networks, so they are S times slower than one network. Here we

1. run SGLD on a one-hidden-layer MLP and, at the same time, distil it into a student of the same size
   with **Bayesian Dark Knowledge** (Korattikara et al. 2015) — the teacher's samples are never needed
   by the student; we keep 100 of them only to evaluate the teacher;
2. distil the stored **SGLD ensemble** into a student with ``distill`` (ensemble → student);
3. distil a point-estimate network **without any of its training inputs**: record its activation
   statistics, synthesise inputs that match them, and distil on those alone (with a student trained on
   pure Gaussian noise for contrast);
4. compare test NLL, accuracy, predictive entropy and calibration (reliability diagram) of the
   teacher, the students and an SGD-trained network of the student's size, and measure the speed-up.

Run: ``python tutorials/05_distillation.py [out_dir] [--quick]``.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from bmm_ppl.distillation.dark_knowledge import BayesianDarkKnowledge  # noqa: E402
from bmm_ppl.distillation.data_free import record_activation_statistics, synthesize_inputs  # noqa: E402
from bmm_ppl.distillation.student import distill  # noqa: E402

HIDDEN = 100


def mlp(hidden: int = HIDDEN) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def load_data(seed: int = 0):
    """Digits scaled to [0, 1]: 1200 training and 597 test images."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[:1200], y[:1200], x[1200:], y[1200:]


@torch.no_grad()
def ensemble_probs(members, x):
    return torch.stack([torch.softmax(m(x), -1) for m in members]).mean(0)


@torch.no_grad()
def module_probs(module, x):
    return torch.softmax(module(x), -1)


def nll(probs, y) -> float:
    return float(-torch.log(probs[torch.arange(len(y)), y].clamp_min(1e-12)).mean())


def accuracy(probs, y) -> float:
    return float((probs.argmax(-1) == y).float().mean())


def entropy(probs) -> torch.Tensor:
    return -(torch.xlogy(probs, probs)).sum(-1)


def reliability(probs, y, bins: int = 10):
    """Per confidence bin: (mean confidence, accuracy, count), and the expected calibration error."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            conf, acc, count = float(confidence[inside].mean()), float(correct[inside].mean()), int(inside.sum())
            rows.append((conf, acc, count))
            ece += count / len(y) * abs(conf - acc)
    return rows, ece


def train_sgd(x, y, steps: int, batch_size: int = 100, lr: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """A point-estimate network (maximum likelihood, minibatch SGD with momentum), same budget as SGLD."""
    torch.manual_seed(seed)
    net = mlp()
    optim = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        rows = torch.randint(0, len(x), (batch_size,))
        loss = torch.nn.functional.cross_entropy(net(x[rows]), y[rows])
        optim.zero_grad()
        loss.backward()
        optim.step()
    return net.eval()


def predict_time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(out_dir, quick: bool = False, seed: int = 0) -> dict:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_data(seed)
    num_steps = 3000 if quick else 10000
    burn_in = num_steps // 5
    num_teacher_samples = 100

    # 1. SGLD teacher -> Bayesian Dark Knowledge student, online.
    start = time.perf_counter()
    bdk = BayesianDarkKnowledge(
        mlp(), mlp(), prior_scale=1.0, step_size=2.5e-4, lr=3e-3, num_steps=num_steps, burn_in=burn_in,
        batch_size=100, perturbation=0.1, store_every=(num_steps - burn_in) // num_teacher_samples, progress=False,
    )
    dark = bdk.fit(x_train, y_train)
    bdk_seconds = time.perf_counter() - start
    teacher = dark.teacher_ensemble()[:num_teacher_samples]
    bdk_student = dark.student.eval()

    # The same network trained as a point estimate, with the same number of minibatch steps.
    sgd_net = train_sgd(x_train, y_train, steps=num_steps, seed=seed + 1)

    # 2. Ensemble -> student with distill on the training inputs. At its defaults distill holds out 10% of
    #    them and trains until the held-out distillation loss stops improving (early stopping, an epoch cap
    #    and a ConvergenceWarning if the cap is hit first). Quick mode runs a fixed short schedule instead
    #    (patience=None: no convergence verdict), so its student is undertrained on purpose.
    torch.manual_seed(seed + 2)
    schedule = {"epochs": 60, "patience": None} if quick else {}
    ens = distill(teacher, mlp(), x_train, lr=3e-3, batch_size=100, progress=False, **schedule)
    ensemble_student = ens.student.eval()

    probs = {
        "SGLD teacher (100 samples)": ensemble_probs(teacher, x_test),
        "BDK student": module_probs(bdk_student, x_test),
        "ensemble -> student": module_probs(ensemble_student, x_test),
        "SGD net": module_probs(sgd_net, x_test),
    }
    table = {name: {"nll": nll(p, y_test), "accuracy": accuracy(p, y_test), "ece": reliability(p, y_test)[1]} for name, p in probs.items()}

    # 3. Data-free: distil the SGD net from its activation records alone.
    torch.manual_seed(seed + 3)
    statistics = record_activation_statistics(sgd_net, x_train)  # attached to sgd_net; only statistics are kept
    synthetic = synthesize_inputs(sgd_net, num_inputs=512 if quick else 2048, steps=100 if quick else 300, lr=0.1, progress=False)
    schedule = {"epochs": 40, "patience": None} if quick else {}
    data_free = distill(sgd_net, mlp(), synthetic, lr=3e-3, batch_size=128, progress=False, **schedule).student.eval()
    noise = torch.randn_like(synthetic)
    noise_student = distill(sgd_net, mlp(), noise, lr=3e-3, batch_size=128, progress=False, **schedule).student.eval()
    data_free_table = {
        "teacher (SGD net)": accuracy(probs["SGD net"], y_test),
        "data-free student": accuracy(module_probs(data_free, x_test), y_test),
        "pure-noise student": accuracy(module_probs(noise_student, x_test), y_test),
    }

    # 4. Speed: the teacher's sample ensemble against one student forward pass, on the test set.
    repeats = 5 if quick else 20
    teacher_seconds = predict_time(lambda: ensemble_probs(teacher, x_test), repeats)
    student_seconds = predict_time(lambda: module_probs(bdk_student, x_test), repeats * 10)

    figures = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, p in probs.items():
        ax.hist(entropy(p).numpy(), bins=30, histtype="step", label=name, density=True)
    ax.set_xlabel("predictive entropy (nats), test set")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    ax.legend()
    figures.append(out_dir / "05_entropy.png")
    fig.tight_layout()
    fig.savefig(figures[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 6.2))
    ax.plot([0, 1], [0, 1], "k:", label="perfect calibration")
    for name, p in probs.items():
        rows, ece = reliability(p, y_test)
        ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram (test set; sparse bins below 0.7 are noisy)", fontsize=9)
    # Below the axes: inside, the legend would cover the high-confidence bins where most digits fall.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    figures.append(out_dir / "05_reliability.png")
    fig.tight_layout()
    fig.savefig(figures[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2, 8, figsize=(10, 3.6))
    with torch.no_grad():
        labels = sgd_net(synthetic[:16]).argmax(-1)
    for ax, image, label in zip(axes.ravel(), synthetic[:16], labels):
        ax.imshow(image.reshape(8, 8).numpy(), cmap="gray_r")
        ax.set_title(f"teacher: {int(label)}", fontsize=8)
        ax.axis("off")
    fig.suptitle("inputs synthesised from activation statistics")
    figures.append(out_dir / "05_synthetic_inputs.png")
    fig.tight_layout()
    fig.savefig(figures[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.barh(["teacher: 100-sample ensemble", "BDK student"], [teacher_seconds * 1e3, student_seconds * 1e3])
    ax.set_xscale("log")
    ax.set_xlabel(f"ms to predict the {len(x_test)} test digits (log scale)")
    ax.set_title(f"one student pass is {teacher_seconds / student_seconds:.0f}x faster than the ensemble", fontsize=10)
    figures.append(out_dir / "05_speed.png")
    fig.tight_layout()
    fig.savefig(figures[-1], dpi=100)
    plt.close(fig)

    results = {
        "figures": [str(f) for f in figures],
        "table": table,
        "data_free": data_free_table,
        "ensemble_agreement": ens.agreement,
        "ensemble_distillation": ens.diagnostics,
        "speedup": teacher_seconds / student_seconds,
        "teacher_seconds": teacher_seconds,
        "student_seconds": student_seconds,
        "bdk_seconds": bdk_seconds,
        "num_steps": num_steps,
        "activation_layers": list(statistics.layers),
    }
    report(results)
    return results


def report(results: dict) -> None:
    """Prints what the run measured."""
    for name, row in results["table"].items():
        print(f"{name:28s} NLL {row['nll']:.4f}  accuracy {row['accuracy']:.4f}  ECE {row['ece']:.4f}")
    for name, value in results["data_free"].items():
        print(f"{name:28s} accuracy {value:.4f}")
    print(f"speed-up {results['speedup']:.0f}x ({results['teacher_seconds'] * 1e3:.2f} ms vs {results['student_seconds'] * 1e3:.3f} ms)")
    print(f"BDK run {results['bdk_seconds']:.1f} s for {results['num_steps']} steps")
    d = results["ensemble_distillation"]
    print(
        f"ensemble -> student: {d['epochs_run']} epochs, converged={d['converged']} (held-out KL {d['best_loss']:.4f} "
        f"at epoch {d['best_epoch']})" + ("" if d["converged"] else " -- quick mode's fixed schedule, not converged")
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="tutorial_output/05", help="folder for the figures")
    parser.add_argument("--quick", action="store_true", help="small settings (what the tests and the docs run)")
    options = parser.parse_args()
    main(options.out_dir, quick=options.quick)
