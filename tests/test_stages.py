"""The stage dispatcher and the stages' layout."""

import ast
import pathlib

STAGES_DIR = pathlib.Path(__file__).resolve().parent.parent / 'depthuda' / 'stages'


def _imported_modules(path: pathlib.Path) -> set[str]:
  """Dotted names of every module `path` imports (`from a import b` gives a and a.b)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def test_stages_never_import_stages():
  """Only the dispatcher (stages/__init__.py) imports stage modules; what two stages share
  lives outside the package."""
  stage_modules = {f'depthuda.stages.{p.stem}' for p in STAGES_DIR.glob('*.py')
                   if p.name != '__init__.py'}
  assert {'depthuda.stages.fit_gmm', 'depthuda.stages.training'} <= stage_modules
  offenders = {p.name: sorted(_imported_modules(p) & (stage_modules | {'depthuda.stages'}))
               for p in STAGES_DIR.glob('*.py') if p.name != '__init__.py'}
  assert {name: mods for name, mods in offenders.items() if mods} == {}
