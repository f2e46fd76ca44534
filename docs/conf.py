"""Sphinx configuration for the krtfuap documentation."""

project = "krtfuap"
author = "krtfuap developers"
release = "0.1.0"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
napoleon_numpy_docstring = True
napoleon_google_docstring = False
autodoc_member_order = "bysource"
html_theme = "alabaster"
exclude_patterns = ["_build"]
