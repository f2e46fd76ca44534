"""Sphinx configuration for the krtfuap documentation."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # document this checkout, installed or not

project = "krtfuap"
author = "krtfuap developers"
release = "0.1.0"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
autodoc_member_order = "bysource"
html_theme = "furo"
html_title = "krtfuap"
exclude_patterns = ["_build"]
myst_heading_anchors = 2  # links to the sections of benchmarks.md, included files' headings among them
# scikit-learn generates these on every estimator; their docstrings point into sklearn's own docs.
autodoc_default_options = {"exclude-members": "set_fit_request, set_transform_request, set_score_request"}
