"""Sphinx configuration of the sse-sam-jax documentation (``sphinx-build -W docs
docs/_build``): autodoc + autosummary + napoleon for the API, MyST for Markdown pages,
myst-nb for the executed example notebook."""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sse_sam_jax  # noqa: E402

project = 'sse-sam-jax'
author = 'The sse-sam-jax authors'
copyright = '2026, The sse-sam-jax authors'
release = sse_sam_jax.__version__
version = release

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.doctest',
    'sphinx.ext.viewcode',
    'myst_nb',
]
source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb', '.ipynb': 'myst-nb'}
exclude_patterns = ['_build', '_generated/*.md', 'README.md', 'Thumbs.db', '.DS_Store',
                    'jupyter_execute']
master_doc = 'index'

autosummary_generate = True
autodoc_typehints = 'description'
autodoc_member_order = 'bysource'
autodoc_default_options = {'members': False, 'show-inheritance': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_enable_extensions = ['dollarmath', 'colon_fence']
myst_heading_anchors = 3
nb_execution_mode = 'force'
nb_execution_timeout = 600
nb_execution_raise_on_error = True
suppress_warnings = ['myst.xref_missing', 'misc.highlighting_failure']

html_theme = 'sphinx_book_theme'
html_title = 'sse-sam-jax'
html_theme_options = {
    'repository_url': 'https://github.com/sse-sam-jax/sse-sam-jax',
    'use_repository_button': True,
}

# ---------------------------------------------------------------- API coverage
# Every name of every public module's ``__all__`` must have an entry in api.md (as
# optax's docs check their coverage): a public name added without one fails the build.
PUBLIC_MODULES = ('sse_sam_jax', 'sse_sam_jax.losses', 'sse_sam_jax.models',
                  'sse_sam_jax.data', 'sse_sam_jax.analysis', 'sse_sam_jax.train')
NOT_DOCUMENTED = {'__version__'}


def documented_names(api_text: str) -> set:
  """``module.name`` of every entry of the autosummary blocks of ``api.md``."""
  names, module = set(), None
  for line in api_text.splitlines():
    m = re.match(r'\.\. currentmodule:: (\S+)|```\{currentmodule\} (\S+)', line.strip())
    if m:
      module = m.group(1) or m.group(2)
      continue
    data = re.match(r'\.\. py:data:: (\S+)', line.strip())
    if data:
      names.add(data.group(1))
      continue
    if line.startswith('    ') and re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', line.strip()):
      names.add(f'{module}.{line.strip()}')
  return names


def check_api_coverage(app):
  import importlib
  documented = documented_names((pathlib.Path(app.srcdir) / 'api.md').read_text())
  missing = []
  for module_name in PUBLIC_MODULES:
    module = importlib.import_module(module_name)
    missing += [f'{module_name}.{n}' for n in module.__all__
                if n not in NOT_DOCUMENTED and f'{module_name}.{n}' not in documented]
  if missing:
    raise RuntimeError(f'public names without an entry in docs/api.md: {missing}')


def write_config_reference(app):
  from sse_sam_jax.train import config_keys
  out = pathlib.Path(app.srcdir) / '_generated' / 'config_reference.md'
  out.parent.mkdir(exist_ok=True)
  text = config_keys.reference_table()
  if not out.exists() or out.read_text() != text:
    out.write_text(text)


def setup(app):
  app.connect('builder-inited', check_api_coverage)
  app.connect('builder-inited', write_config_reference)
