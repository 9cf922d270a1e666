"""Sphinx configuration for the matsciml documentation."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "matsciml"
author = "matsciml developers"
copyright = "2026, matsciml developers"  # noqa: A001
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
napoleon_numpy_docstring = True
napoleon_google_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_mock_imports = ["dgl"]
exclude_patterns = ["_build", "dynamics_faults.rst", "callbacks_core.rst"]
html_theme = "alabaster"
nitpicky = False
