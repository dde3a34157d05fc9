"""The bmm command and the demo it runs."""

import subprocess
import sys

import bmm_ppl
from bmm_ppl import cli, demo


def test_version(capsys):
    try:
        cli.main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert bmm_ppl.__version__ in capsys.readouterr().out


def test_demo_prefers_a_moderate_degree_and_writes_figures(tmp_path):
    lines = []
    results = demo.main(tmp_path, quick=True, stream=lines.append)
    comparison, errors = results["comparison"], results["errors"]
    best = int(comparison.best.split()[-1])
    assert 3 <= best <= 5
    evidence = {int(n.split()[-1]): e.value for n, e in comparison.evidences.items()}
    assert max(evidence[d] for d in (3, 4, 5)) > max(evidence[d] for d in range(7, 10))
    # ...although degrees >= 7 fit the training points better (least squares).
    assert min(errors[f"degree {d}"]["train_ml"] for d in range(7, 10)) < errors[comparison.best]["train_ml"]
    for name in ("evidence_vs_degree.png", "errors_vs_degree.png", "bma_predictive.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert any("Highest evidence" in line for line in lines)


def test_console_script_runs_from_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "bmm_ppl.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"bmm_ppl {bmm_ppl.__version__}"
