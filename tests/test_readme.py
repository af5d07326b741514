"""Every Python block of the README and of the documentation's pages runs as written,
each in a fresh namespace (the notebooks' cells run when the docs are built)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').rglob('*.md'))
BLOCKS = [(page.relative_to(ROOT).as_posix(), i, code) for page in PAGES
          if '_build' not in page.parts and '_generated' not in page.parts
          for i, code in enumerate(re.findall(r'```python\n(.*?)```', page.read_text(),
                                              flags=re.S))]


def test_readme_and_docs_have_python_blocks():
  pages = {page for page, _, _ in BLOCKS}
  assert 'README.md' in pages and 'docs/optimizers.md' in pages and 'docs/composition.md' in pages
  assert len(BLOCKS) >= 6


@pytest.mark.parametrize('page,index,code', BLOCKS, ids=[f'{p}:{i}' for p, i, _ in BLOCKS])
def test_block_runs(page, index, code, capsys):
  if 'flax' in code:
    pytest.importorskip('flax')
  exec(compile(code, f'{page} python block {index}', 'exec'), {'__name__': '__readme__'})  # pylint: disable=exec-used
  if 'final batch loss' in code:  # the main example trains: its loss must have come down
    loss = float(capsys.readouterr().out.split()[-1])
    assert loss < 0.6, loss
