"""The mutation audit's table stays true to the code: every mutant's snippet occurs once,
in one library file (a snippet left behind by a refactor fails here, not in the audit)."""

from tests import mutation_audit


def test_every_mutant_snippet_is_found_once():
  files = {name: mutation_audit.locate(name, original)
           for name, (original, _) in mutation_audit.MUTANTS.items()}
  assert len(files) == len(mutation_audit.MUTANTS) >= 50
  for name, (original, mutant) in mutation_audit.MUTANTS.items():
    assert original != mutant, name
