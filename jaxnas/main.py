"""The jaxnas main job: ``python -m jaxnas.main --config=configs/darts.py --workdir=runs/darts``.

``--config`` is an ml_collections config file taking an optional argument (``configs/darts.py:smoke``);
any field can be overridden on the command line (``--config.search.epochs=10``). ``config.mode`` selects
what runs in ``--workdir`` (see ``MODES``): ``search`` (bi-level search, resumable), ``derive`` (genotype.json
from the final alphas), ``train`` (retraining of ``config.genotype``, resumable; ``jaxnas.train``),
``evaluate`` (robustness of the network trained in the workdir; ``jaxnas.evaluate``) and ``pipeline`` (the
stages of ``PIPELINE`` in order). The seconds of search, train and evaluate are added to the workdir's
timing.json; train, evaluate and pipeline end by writing report.json, report.md and figures/. Errors in the
config, the data or the run are reported as one line on stderr (exit status 1; 2 for command-line errors);
the traceback goes to the workdir's log.txt.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
import traceback

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxnas import evaluate, parallel, report, search, train
from jaxnas import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file with get_config(arg), e.g. configs/darts.py or configs/darts.py:smoke.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the run: checkpoints, logs and results.')
_CACHE = flags.DEFINE_string(
    'compilation_cache',
    os.environ.get('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.expanduser('~'), '.cache', 'jaxnas', 'xla')),
    "Persistent XLA compilation cache: a rerun, a resume or another process compiling the same step loads it "
    "from here instead of compiling again ('' turns the cache off; default $JAX_COMPILATION_CACHE_DIR if set).")

# Stages of the pipeline mode, in order, with the sub-directory of the workdir each runs in.
PIPELINE = [('search', ''), ('derive', ''), ('train', 'train'), ('evaluate', 'train')]
TIMED = ('search', 'train', 'evaluate')  # stages whose seconds go to timing.json (the report's cost table)


def run_stage(mode: str, config, stage_dir: str, workdir: str):
  """Runs ``MODES[mode]`` in ``stage_dir``, adding its seconds to ``workdir``'s timing.json; its result."""
  start = time.perf_counter()
  result = MODES[mode](config, stage_dir)
  if mode in TIMED and jax.process_index() == 0:  # process 0 writes the workdir's shared files
    report.record_timing(workdir, mode, time.perf_counter() - start, jax.device_count(),
                         jax.devices()[0].device_kind)
  return result


def pipeline(config, workdir: str):
  """search -> derive -> train -> evaluate in one workdir: the search in the workdir itself, training and
  evaluation of the derived genotype in ``workdir/train``. Every stage resumes or skips its finished work, so
  rerunning the command continues; it stops after a search or training that ended early at its max_steps."""
  missing = [k for k in ('train', 'evaluate') if k not in config]
  if missing:
    raise ValueError(f'config.mode=pipeline also trains and evaluates, but the config has no {missing} '
                     'section(s): start from configs/quickstart.py, or use config.mode=search')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.genotype = os.path.abspath(workdir)  # train the search result
  for mode, sub in PIPELINE:
    if run_stage(mode, config, os.path.join(workdir, sub), workdir) is None and mode in ('search', 'train'):
      return None
  return workdir


# config.mode -> function(config, workdir).
MODES = {'search': search.run, 'derive': search.derive, 'train': train.run, 'evaluate': evaluate.evaluate_run,
         'pipeline': pipeline}


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
  except SyntaxError as e:
    _error(f'cannot load --config: SyntaxError: {e}', 2)


def main(argv) -> int:
  """Runs ``config.mode`` (flags already parsed)."""
  parallel.set_gpu_xla_flags()  # before JAX starts its backends
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # JAX's start-up INFO lines are noise on the console
  if len(argv) > 1:
    _error(f'unexpected arguments {argv[1:]}: pass settings as --config.<field>=<value>', 2)
  try:
    config, workdir = _CONFIG.value, _WORKDIR.value
    mode = None if config is None else config.get('mode', 'search')  # ml_collections loads the file lazily
  except OSError as e:  # a missing config file, or one that does not run (the first error is the cause)
    cause = e
    while cause.__cause__ is not None:
      cause = cause.__cause__
    _error(f'cannot load --config: {type(cause).__name__}: {_one_line(cause)}', 2)
  if config is None or not workdir:
    _error('both --config (e.g. configs/quickstart.py) and --workdir are required', 2)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    _error(f'--workdir={workdir} is a file: name a directory (new, or a run to resume)', 2)
  if mode not in MODES:
    _error(f'unknown mode {mode!r}: set config.mode to one of {sorted(MODES)}', 2)
  if _CACHE.value:
    jax.config.update('jax_compilation_cache_dir', _CACHE.value)
  if config.get('parallel', {}).get('distributed', False):
    parallel.initialize()  # multi-process launch (TPU pod, SLURM, JAX_COORDINATOR_ADDRESS/...): before any JAX work
  try:
    if (run_stage(mode, config, workdir, workdir) is not None and mode in ('train', 'evaluate', 'pipeline')
        and jax.process_index() == 0):
      print('\n'.join(['report:'] + report.write_report(workdir)), file=sys.stderr)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    _log_traceback(workdir)
    _error(str(e), 1)
  except OSError as e:  # the system refused a read or write: unwritable or full disk, a path through a file
    _log_traceback(workdir)
    _error(workdir_lib.os_error_message(e, 'check --workdir and the data paths'), 1)
  return 0


def _log_traceback(workdir: str) -> None:
  """Appends the traceback of the error being handled to the workdir's log, when it can."""
  try:
    with open(workdir_lib.path(workdir, workdir_lib.LOG), 'a', encoding='utf-8') as log:
      log.write(traceback.format_exc())
  except OSError:
    pass


def run(argv=None) -> None:
  """The console entry point (``python -m jaxnas.main``)."""
  app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
