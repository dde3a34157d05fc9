"""The tutorial pages and notebooks of the documentation site, made from the tutorial scripts.

Each tutorial has one source, ``tutorials/NN_name.py``. Rendering runs the script with ``--quick``
(small settings) and saves what it printed and the figures it wrote under ``docs/tutorials/NN_name/``,
with ``rendered.json`` recording the script's SHA-256, the settings, the time it took and the versions.
At build time the mkdocs hook ``on_files`` makes, for every script, its page (the docstring as the
introduction, the saved output and figures, the source) and its notebook (the same script through
jupytext, the ``__main__`` block replaced by a call of ``main``). ``stale_tutorials()`` names the
scripts whose saved outputs are missing or were made from another version of the script; the test
suite fails on any, so the pages always show what the current scripts print.

Render all tutorials, or some by number::

    python docs/hooks/tutorial_pages.py          # all
    python docs/hooks/tutorial_pages.py 01 07    # tutorials 01 and 07
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = REPOSITORY / "tutorials"
OUTPUTS = REPOSITORY / "docs" / "tutorials"
RECORD = "rendered.json"
OUTPUT_TEXT = "output.txt"
FIGURE_SUFFIXES = (".png", ".svg")


def tutorial_scripts() -> list[pathlib.Path]:
    """The tutorial scripts ``tutorials/NN_*.py``, in order."""
    return sorted(SCRIPTS.glob("[0-9][0-9]_*.py"))


def script_digest(script: pathlib.Path) -> str:
    """SHA-256 of the script's bytes: what a saved rendering must have been made from."""
    return hashlib.sha256(script.read_bytes()).hexdigest()


def saved_record(script: pathlib.Path) -> dict | None:
    """The ``rendered.json`` of the script's saved outputs, or ``None`` if it was never rendered."""
    path = OUTPUTS / script.stem / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def stale_tutorials() -> list[str]:
    """Scripts whose saved outputs are missing, incomplete or made from another version of the script."""
    stale = []
    for script in tutorial_scripts():
        record = saved_record(script)
        folder = OUTPUTS / script.stem
        if (
            record is None
            or record["sha256"] != script_digest(script)
            or not (folder / OUTPUT_TEXT).exists()
            or not all((folder / name).exists() for name in record["figures"])
        ):
            stale.append(script.name)
    return stale


def render(script: pathlib.Path, python: str = sys.executable) -> dict:
    """Runs ``script --quick`` into its output folder and saves its printed output and figure list.

    The folder is emptied first, so figures that the script no longer writes disappear. The tutorials
    fit with ``progress=False`` (``TQDM_DISABLE`` silences any other bar; an engine's explicit
    ``progress=True`` would override it); warnings stay in the output, in the order they were printed,
    with the repository's path removed and the output folder written ``OUT_DIR``.
    """
    folder = OUTPUTS / script.stem
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    environment = dict(os.environ, TQDM_DISABLE="1", MPLBACKEND="Agg", PYTHONHASHSEED="0")
    start = time.perf_counter()
    completed = subprocess.run(
        [python, str(script), str(folder), "--quick"], cwd=REPOSITORY, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{script.name} failed (exit {completed.returncode}):\n{completed.stdout[-4000:]}")
    # Paths as a reader running the script would see them: the repository's prefix removed, the folder named.
    output = completed.stdout.replace(str(folder), "OUT_DIR").replace(str(REPOSITORY) + os.sep, "")
    output = output.replace(str(folder.relative_to(REPOSITORY)), "OUT_DIR")
    (folder / OUTPUT_TEXT).write_text(output)
    figures = sorted((p for p in folder.iterdir() if p.suffix in FIGURE_SUFFIXES), key=lambda p: (p.stat().st_mtime, p.name))
    for leftover in folder.iterdir():
        if leftover.suffix not in FIGURE_SUFFIXES and leftover.name != OUTPUT_TEXT:
            leftover.unlink()
    import torch

    import bmm_ppl

    record = {
        "script": f"tutorials/{script.name}",
        "sha256": script_digest(script),
        "settings": "--quick",
        "seconds": round(seconds, 1),
        "rendered": time.strftime("%Y-%m-%d", time.gmtime()),
        "versions": {"bmm_ppl": bmm_ppl.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "figures": [p.name for p in figures],
    }
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def split_docstring(source: str) -> tuple[str, str, str]:
    """``(title, introduction, code)`` of a tutorial script: its docstring's first line, the rest, the code after it."""
    module = ast.parse(source)
    docstring = ast.get_docstring(module, clean=True) or ""
    title, _, introduction = docstring.partition("\n")
    first = module.body[0]
    code = "\n".join(source.splitlines()[first.end_lineno:]) if isinstance(first, ast.Expr) else source
    return title.strip(), introduction.strip(), code.strip("\n")


def docstring_markdown(text: str) -> str:
    r"""A tutorial docstring as Markdown: a blank line before a list that follows a paragraph line.

    Examples:
        >>> print(docstring_markdown("Steps:\n1. one\n   more\n2. two"))
        Steps:
        <BLANKLINE>
        1. one
           more
        2. two
    """
    lines, previous = [], ""
    for line in text.splitlines():
        starts_list = re.match(r"(\d+\.|[-*]) ", line)
        in_list = re.match(r"(\d+\.|[-*]) |\s", previous)
        if starts_list and previous.strip() and not in_list:
            lines.append("")
        lines.append(line)
        previous = line
    return "\n".join(lines)


def page_markdown(script: pathlib.Path) -> str:
    """The Markdown page of one tutorial, from its script and its saved outputs."""
    source = script.read_text()
    title, introduction, _ = split_docstring(source)
    record = saved_record(script) or {"figures": [], "seconds": None, "rendered": None, "versions": {}}
    folder = OUTPUTS / script.stem
    output = (folder / OUTPUT_TEXT).read_text() if (folder / OUTPUT_TEXT).exists() else "(not rendered yet)"
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines = [
        f"# {title}",
        "",
        docstring_markdown(introduction),
        "",
        '!!! note "How this page was made"',
        f"    The output and figures below are those of `python tutorials/{script.name} OUT_DIR --quick`, the small",
        "    settings that the test suite also runs; they are not the full run's numbers, which the text above quotes",
        f"    where it gives figures. Rendered on {record['rendered']} in {record['seconds']} s ({versions}).",
        f"    Run it yourself: `python tutorials/{script.name} OUT_DIR` (full) or `--quick`; or download the",
        f"    [notebook]({script.stem}.ipynb).",
        "",
        "## Output",
        "",
        "```text",
        output.rstrip("\n"),
        "```",
        "",
        "## Figures",
        "",
    ]
    for name in record["figures"]:
        caption = re.sub(r"^\d+_", "", pathlib.Path(name).stem).replace("_", " ")
        lines += [f"![{caption}]({script.stem}/{name})", "", f"*{name}*", ""]
    lines += ["## Source", "", f'??? example "tutorials/{script.name}"', "", "    ```python"]
    lines += [f"    {line}" if line else "" for line in source.splitlines()]
    lines += ["    ```", ""]
    return "\n".join(lines)


def notebook_json(script: pathlib.Path) -> str:
    """The script as a Jupyter notebook (jupytext): docstring as Markdown, ``main`` run with ``quick=True``,
    then the figures it saved shown."""
    import jupytext
    import nbformat

    source = script.read_text()
    title, introduction, code = split_docstring(source)
    number = script.name[:2]
    code = code.split('if __name__ == "__main__":')[0].rstrip()
    if not re.search(r"^import pathlib$", code, re.M):
        code = "import pathlib\n\n" + code
    notebook = jupytext.reads(code, fmt="py:light")
    notebook.cells.insert(0, nbformat.v4.new_markdown_cell(f"# {title}\n\n{introduction}"))
    notebook.cells.append(nbformat.v4.new_markdown_cell("Run the tutorial (`quick=False` for the full settings):"))
    notebook.cells.append(nbformat.v4.new_code_cell(f'results = main("tutorial_output/{number}", quick=True)'))
    # The tutorials save and close their figures (some select the Agg backend): show the saved files.
    notebook.cells.append(nbformat.v4.new_code_cell(
        "from IPython.display import Image, display\n\n"
        f'for figure in sorted(pathlib.Path("tutorial_output/{number}").glob("*.png")):\n'
        "    display(Image(filename=str(figure)))"
    ))
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata.pop("jupytext", None)
    return jupytext.writes(notebook, fmt="ipynb")


def on_files(files, config):
    """mkdocs hook: adds each tutorial's page ``tutorials/NN_name.md`` and notebook ``tutorials/NN_name.ipynb``."""
    from mkdocs.structure.files import File

    for script in tutorial_scripts():
        files.append(File.generated(config, f"tutorials/{script.stem}.md", content=page_markdown(script)))
        files.append(File.generated(config, f"tutorials/{script.stem}.ipynb", content=notebook_json(script)))
    return files


def main(numbers: list[str]) -> None:
    scripts = [s for s in tutorial_scripts() if not numbers or s.name[:2] in numbers]
    for script in scripts:
        print(f"rendering {script.name} ...", flush=True)
        record = render(script)
        print(f"  {record['seconds']} s, figures: {', '.join(record['figures'])}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
