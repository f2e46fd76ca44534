"""The Sphinx documentation builds with warnings treated as errors, with every page and public name."""

import importlib
from html import unescape
import re
import subprocess
import sys
from pathlib import Path

import pytest
from processes import TIMEOUT_S

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = (
    "index", "install", "quickstart", "custom_model", "method", "robustness", "cloak", "evaluation", "benchmarks", "api",
)
FIGURES = ("masks.png", "perturbation.png", "faces.png")
DOCUMENTED_MODULES = (
    "attack", "key_regions", "baselines", "masks", "landmarks", "flow", "perturbation", "losses", "stealth",
    "metrics", "scoring", "engine", "estimator", "models", "imagenet", "datasets", "alignment", "diversity",
    "augment", "photo_face", "paste", "refine", "cloak_defaults", "threads", "pretrained", "models.ensemble", "models.dlib_resnet", "apps.demo", "apps.cloak", "apps.judges", "apps.cli", "apps.benchmark", "apps.report",
)


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """The HTML site, built once for this module with ``-W --keep-going``."""
    out = tmp_path_factory.mktemp("html")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_sphinx_build_has_no_warnings_and_builds_every_page(html):
    for page in PAGES:
        assert (html / f"{page}.html").is_file(), f"{page}.html was not built"
    assert "furo" in (html / "index.html").read_text(encoding="utf-8")


def test_method_page_shows_the_committed_figures(html):
    method = (html / "method.html").read_text(encoding="utf-8")
    for figure in FIGURES:
        assert f"_images/{figure}" in method
        assert (html / "_images" / figure).is_file()
    assert "make_figures.py" in method
    # Small enough to keep in the repository.
    assert sum((DOCS / "_static" / figure).stat().st_size for figure in FIGURES) < 300 * 1024


def test_benchmark_page_includes_the_results_and_the_report(html):
    """One page shows everything in benchmarks/: the scripts' RESULTS.md and the `krtfuap benchmark` report."""
    raw = (html / "benchmarks.html").read_text(encoding="utf-8")
    page = unescape(re.sub(r"<[^>]+>", "", raw))
    for included in ("RESULTS.md", "report/report.md"):
        text = (DOCS.parent / "benchmarks" / included).read_text(encoding="utf-8")
        headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
        assert headings, f"benchmarks/{included} has no sections"
        for heading in headings:
            assert heading.replace("`", "") in page, (included, heading)
    figures = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", (DOCS.parent / "benchmarks" / "report" / "report.md").read_text())
    assert figures, "the report shows no figure"
    for figure in figures:
        assert f"_images/{figure}" in raw and (html / "_images" / figure).is_file(), figure


def test_api_page_documents_every_public_name(html):
    anchors = set(re.findall(r'id="([^"]+)"', (html / "api.html").read_text(encoding="utf-8")))
    missing = [
        f"krtfuap.{module}.{name}"
        for module in DOCUMENTED_MODULES
        for name in importlib.import_module(f"krtfuap.{module}").__all__
        if f"krtfuap.{module}.{name}" not in anchors
    ]
    krtfuap = importlib.import_module("krtfuap")
    missing += [
        f"krtfuap.{name}"
        for name in krtfuap.__all__
        if f"{getattr(krtfuap, name).__module__}.{name}" not in anchors
    ]
    assert not missing, f"not in the API reference: {missing}"
