"""The jaxnas main job: ``python -m jaxnas.main --config=configs/darts.py --workdir=runs/darts``.

``--config`` is an ml_collections config file taking an optional argument (``configs/darts.py:smoke``);
any field can be overridden on the command line (``--config.search.epochs=10``). ``config.mode`` selects
what runs in ``--workdir`` (see ``MODES``): ``search`` (bi-level search, resumable), ``derive`` (genotype.json
from the final alphas) and ``pipeline`` (the stages of ``PIPELINE`` in order). Retraining and evaluation
register themselves in ``MODES`` as ``train`` / ``evaluate`` (functions ``(config, workdir)``) and join
``PIPELINE``. Errors in the config, the data or the run are reported as one line on stderr (exit status 1;
2 for command-line errors); the traceback goes to the workdir's log.txt.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxnas import search
from jaxnas import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file with get_config(arg), e.g. configs/darts.py or configs/darts.py:smoke.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the run: checkpoints, logs and results.')

# Stages of the pipeline mode, in order; train and evaluate are appended where they are implemented.
PIPELINE = ['search', 'derive']


def pipeline(config, workdir: str) -> None:
  """Runs the stages of ``PIPELINE`` in order in one workdir (search -> derive -> ...); stops after a search
  that ended early at ``config.max_steps`` (rerunning continues it)."""
  for stage in PIPELINE:
    if MODES[stage](config, workdir) is None and stage == 'search':
      return


# config.mode -> function(config, workdir).
MODES = {'search': search.run, 'derive': search.derive, 'pipeline': pipeline}


def _error(message: str, status: int):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _load_config(argv):
  """The config named by ``--config=FILE[:ARG]`` in ``argv``, loaded without overrides (for messages)."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
  filename, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('jaxnas_config_for_message', filename)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _config_key_error(argv) -> str:
  """The one-line message for an override naming a field the config lacks (ml_collections only says
  ``AttributeError: 'key'``)."""
  config = _load_config(argv)
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    node, where = config, 'config'
    for name in arg[len('--config.'):].split('=', 1)[0].split('.'):
      key, _, index = name.partition('[')
      if not hasattr(node, 'keys') or key not in node:
        known = sorted(node.keys()) if hasattr(node, 'keys') else []
        return f'unknown config key {key!r} in {arg.split("=", 1)[0]}: {where} has the fields {known}'
      node, where = node[key], f'{where}.{key}'
      if index:
        node, where = node[int(index.rstrip(']'))], f'{where}[{index}'
  return 'unknown config key in ' + ' '.join(a for a in argv[1:] if a.startswith('--config.'))


def _one_line(message: str) -> str:
  """The first and the last line of a multi-line message (ml_collections embeds tracebacks)."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  return ' '.join(lines[:1] + lines[-1:]) if len(lines) > 1 else ''.join(lines)


def parse_flags(argv):
  """absl's flag parsing with one-line errors for unknown config keys, bad values and missing flags.

  ml_collections reads the overrides from ``sys.argv`` and defines one flag per overridden field; those of
  a previous parse are dropped first, so the entry point can run repeatedly in one process (tests).
  """
  for name in list(flags.FLAGS):
    if name.startswith('config.'):
      delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  sys.argv = list(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _error(f'{_one_line(e)} (see --help)', 2)
  except (AttributeError, KeyError, IndexError):
    _error(_config_key_error(argv), 2)
  except (TypeError, ValueError) as e:
    _error(f'invalid config override: {_one_line(e)}', 2)


def main(argv) -> int:
  """Runs ``config.mode`` (flags already parsed)."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # JAX's start-up INFO lines are noise on the console
  if len(argv) > 1:
    _error(f'unexpected arguments {argv[1:]}: pass settings as --config.<field>=<value>', 2)
  try:
    config, workdir = _CONFIG.value, _WORKDIR.value
  except OSError as e:  # ml_collections reports a missing config file here
    _error(f'cannot load --config: {_one_line(e)}', 2)
  if config is None or not workdir:
    _error('both --config (e.g. configs/quickstart.py) and --workdir are required', 2)
  mode = config.get('mode', 'search')
  if mode not in MODES:
    _error(f'unknown mode {mode!r}: set config.mode to one of {sorted(MODES)}', 2)
  try:
    MODES[mode](config, workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    if os.path.isdir(workdir):
      with open(workdir_lib.path(workdir, workdir_lib.LOG), 'a', encoding='utf-8') as log:
        log.write(traceback.format_exc())
    _error(str(e), 1)
  return 0


def run(argv=None) -> None:
  """The console entry point (``python -m jaxnas.main``)."""
  app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
