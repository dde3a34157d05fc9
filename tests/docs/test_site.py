"""The documentation site builds offline with ``mkdocs build --strict`` and shows what it promises.

Promises checked on the built HTML: every public name (``__all__``) of every subpackage has a reference
entry; every tutorial page shows the figures its saved rendering recorded, and the image files exist;
every tutorial has a valid notebook; the saved tutorial outputs were made from the current scripts.
"""

import html.parser
import importlib
import importlib.util
import os
import pathlib
import pkgutil
import subprocess
import sys

import nbformat

import bmm_ppl

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


def tutorial_pages_module():
    spec = importlib.util.spec_from_file_location("tutorial_pages", REPOSITORY / "docs" / "hooks" / "tutorial_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ImageAndAnchorParser(html.parser.HTMLParser):
    """Collects ``<img src>`` values and element ids of an HTML page."""

    def __init__(self):
        super().__init__()
        self.images, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img" and "src" in attributes:
            self.images.append(attributes["src"])
        if "id" in attributes:
            self.ids.add(attributes["id"])


def parse(page: pathlib.Path) -> ImageAndAnchorParser:
    parser = ImageAndAnchorParser()
    parser.feed(page.read_text())
    return parser


def public_subpackages() -> dict[str, list[str]]:
    """``{"bmm_ppl.inference": [...its __all__...], ...}`` for the package and each subpackage with ``__all__``."""
    names = {"bmm_ppl": list(bmm_ppl.__all__)}
    for info in pkgutil.walk_packages(bmm_ppl.__path__, prefix="bmm_ppl."):
        if info.ispkg:
            module = importlib.import_module(info.name)
            if hasattr(module, "__all__"):
                names[info.name] = list(module.__all__)
    return names


def reference_page(site: pathlib.Path, package: str) -> pathlib.Path:
    stem = "bmm_ppl" if package == "bmm_ppl" else package.removeprefix("bmm_ppl.")
    return site / "reference" / stem / "index.html"


def test_saved_tutorial_outputs_come_from_the_current_scripts():
    stale = tutorial_pages_module().stale_tutorials()
    assert not stale, f"re-render with `python docs/hooks/tutorial_pages.py`: saved outputs are stale for {stale}"


def test_site_builds_strict_with_every_reference_entry_figure_and_notebook(tmp_path):
    site = tmp_path / "site"
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPOSITORY, capture_output=True, text=True, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )
    assert completed.returncode == 0, completed.stderr[-6000:]

    # Every public name of every subpackage has an entry (an anchor) on its subpackage's reference page.
    missing = []
    for package, names in public_subpackages().items():
        page = reference_page(site, package)
        assert page.exists(), f"no reference page for {package} (add docs/reference/... and the nav entry)"
        ids = parse(page).ids
        missing += [f"{package}.{name}" for name in names if f"{package}.{name}" not in ids]
    assert not missing, f"public names without a reference entry: {missing}"

    # Every tutorial page shows each figure its rendering recorded, and each image file exists.
    pages = tutorial_pages_module()
    for script in pages.tutorial_scripts():
        record = pages.saved_record(script)
        page = site / "tutorials" / script.stem / "index.html"
        images = parse(page).images
        assert record["figures"], f"{script.name} recorded no figures"
        for figure in record["figures"]:
            shown = [src for src in images if src.endswith(f"/{figure}") or src == figure]
            assert shown, f"{page} does not show {figure}"
            assert all((page.parent / src).resolve().exists() for src in shown), f"{figure} of {script.name} missing"
        notebook = nbformat.read(site / "tutorials" / f"{script.stem}.ipynb", as_version=4)
        nbformat.validate(notebook)
        code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
        assert "def main(" in code and "main(" in notebook.cells[-2].source and "display(" in notebook.cells[-1].source
        assert '__name__ == "__main__"' not in code  # the command-line block would parse the kernel's argv
        for cell in notebook.cells:
            if cell.cell_type == "code":
                compile(cell.source, f"{script.stem}.ipynb", "exec")  # each cell is valid Python on its own

    # The pages the issue names exist: home, concepts, one per engine, peers, changelog.
    for page in ("index.html", "concepts/evidence/index.html", "engines/laplace/index.html", "peers/index.html",
                 "changelog/index.html"):
        assert (site / page).exists(), page
