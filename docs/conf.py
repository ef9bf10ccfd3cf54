"""Sphinx configuration: the API reference, built from the docstrings.

``make docs`` builds it with warnings as errors (``-W``), so a docstring that
does not render (bad indentation, an unclosed literal, a broken math block)
fails the build, and so does a page that is not in the table of contents.
"""

import optax_lean

project = 'optax_lean'
author = 'optax_lean authors'
release = optax_lean.__version__
version = release

extensions = [
  'myst_parser',
  'sphinx.ext.autodoc',
  'sphinx.ext.autosummary',
  'sphinx.ext.mathjax',
  # MathJax ships with the built pages, so the maths renders without network.
  'sphinx-mathjax-offline',
  'sphinx.ext.napoleon',
  'sphinx.ext.viewcode',
]
source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
exclude_patterns = ['_build']

autodoc_typehints = 'none'
autodoc_member_order = 'bysource'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False
myst_heading_anchors = 3

html_theme = 'furo'
html_title = f'optax_lean {release}'
