"""Every Python block of the README runs as written, each in a fresh namespace."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'
BLOCKS = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 5


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_readme_block_runs(index, capsys):
  code = BLOCKS[index]
  if 'flax' in code:
    pytest.importorskip('flax')
  exec(compile(code, f'README.md python block {index}', 'exec'), {'__name__': '__readme__'})  # pylint: disable=exec-used
  if 'final batch loss' in code:  # the main example trains: its loss must have come down
    loss = float(capsys.readouterr().out.split()[-1])
    assert loss < 0.6, loss
