"""The workdir of a run: its layout, the human-readable log, the progress display and the metric writers.

Layout of a search workdir::

  config.json          the resolved config of the latest start of the run
  log.txt              human-readable log: settings, periodic step lines, per-epoch summaries, errors
  metrics.jsonl        one JSON object per line: {"step": ..., "epoch": ..., "<name>": value, ...}
  events.out.tfevents.*  TensorBoard scalars, when clu's TensorFlow writer is importable
  checkpoints/<step>/  orbax checkpoints: search state, data position (jaxnas.checkpoint)
  history/epoch_XXX_genotype.json, history/epoch_XXX_alphas.npz   after every epoch (XXX from 000)
  genotype.json        the final derived genotype (the search result)
  alphas.npz           the final alphas, one array per cell type

Restarting the same command in the same workdir resumes from the latest checkpoint; metric lines written
after that checkpoint by the interrupted run are dropped so the files read as one run. Restarting with another
config is refused (``check_same_run``), except for the fields of ``RESUMABLE_CHANGES``.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from typing import Mapping, TextIO

import numpy as np

from jaxnas import genotypes

CONFIG = 'config.json'
LOG = 'log.txt'
METRICS = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'
HISTORY = 'history'
GENOTYPE = 'genotype.json'
ALPHAS = 'alphas.npz'


def path(workdir: str, *names: str) -> str:
  return os.path.join(workdir, *names)


_PERMISSIONS_FIX = 'use a workdir and data files this user may write and read'
_DISK_FULL_FIX = 'free disk space or use a workdir on another disk'
_OS_FIXES = {errno.EACCES: _PERMISSIONS_FIX, errno.EPERM: _PERMISSIONS_FIX,
             errno.EROFS: 'use a workdir on a writable file system',
             errno.ENOSPC: _DISK_FULL_FIX, errno.EDQUOT: _DISK_FULL_FIX}


def os_error_message(e: OSError, fix: str) -> str:
  """One line for a read or write the system refused: what, which file, and the fix (``fix`` when the error
  has no specific one)."""
  return f'{e.strerror or e}: {e.filename!r}: {_OS_FIXES.get(e.errno, fix)}'


def history_path(workdir: str, epoch: int, kind: str) -> str:
  """``history/epoch_XXX_genotype.json`` (``kind='genotype'``) or ``..._alphas.npz`` (``kind='alphas'``)."""
  suffix = {'genotype': 'genotype.json', 'alphas': 'alphas.npz'}[kind]
  return path(workdir, HISTORY, f'epoch_{epoch:03d}_{suffix}')


def _atomic_write(filename: str, write) -> None:
  """Writes through a temporary file and a rename, so readers never see a partial file."""
  os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
  tmp = f'{filename}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    write(f)
  os.replace(tmp, filename)


# Fields a resumed run may change: where the data lies, how often to log and checkpoint, where to stop, the
# devices (jaxnas.parallel: the same global batch gives the same run) and the evaluation settings.
RESUMABLE_CHANGES = ('mode', 'max_steps', 'train.max_steps', 'parallel', 'checkpoint_every_steps',
                     'keep_checkpoints', 'log_every_steps', 'data.data_dir', 'evaluate', 'train.eval_every_epochs',
                     'train.eval_examples', 'train.eval_batch_size', 'train.eval_eps', 'train.eval_steps')


def _config_text(config) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True) if hasattr(config, 'to_json_best_effort') \
      else json.dumps(config, indent=2, sort_keys=True)


def write_config(workdir: str, config) -> None:
  text = _config_text(config)
  _atomic_write(path(workdir, CONFIG), lambda f: f.write(text.encode() + b'\n'))


def read_json(filename: str, fix: str):
  """The content of a JSON file of a workdir, with one-line errors naming the file (missing or damaged)."""
  try:
    with open(filename, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f'{filename} not found: {fix}') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{filename} is damaged ({type(e).__name__}: {e}): {fix}') from None


def _flatten(tree, prefix: str = '') -> dict:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f'{prefix}{key}.').items()}
  return {prefix[:-1]: tree}


def check_same_run(workdir: str, config) -> None:
  """Raises a one-line ``ValueError`` when ``workdir``'s ``config.json`` (the run a checkpoint there belongs
  to) differs from ``config`` in a field outside ``RESUMABLE_CHANGES``: resuming would silently continue
  another run. Fields only one of them has (a config of another jaxnas version) are not compared."""
  filename = path(workdir, CONFIG)
  if not os.path.isfile(filename):
    return
  before = _flatten(read_json(filename, 'delete it to start a new run there, or use a new workdir'))
  now = _flatten(json.loads(_config_text(config)))
  free = lambda key: any(key == k or key.startswith(k + '.') for k in RESUMABLE_CHANGES)
  changed = [k for k in sorted(before.keys() & now.keys()) if before[k] != now[k] and not free(k)]
  if changed:
    shown = ', '.join(f'{k}: {before[k]!r} -> {now[k]!r}' for k in changed[:4])
    more = f' and {len(changed) - 4} more' if len(changed) > 4 else ''
    raise ValueError(f'{workdir} holds a run of another config ({shown}{more}): rerun with its config '
                     f'({filename}) to resume it, or use a new workdir')


def save_genotype(filename: str, genotype: genotypes.Genotype) -> None:
  _atomic_write(filename, lambda f: f.write(genotype.to_json(indent=1).encode() + b'\n'))


def save_alphas(filename: str, alphas: Mapping[str, np.ndarray]) -> None:
  arrays = {t: np.asarray(a, np.float32) for t, a in alphas.items()}
  _atomic_write(filename, lambda f: np.savez(f, **arrays))


def load_alphas(filename: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(filename):
    raise FileNotFoundError(f'no alphas at {filename}: run the search first (config.mode=search) in this workdir')
  with np.load(filename) as f:
    return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------------------------
# Console and log.
# ------------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f'{h}:{rem // 60:02d}:{rem % 60:02d}' if h else f'{rem // 60:02d}:{rem % 60:02d}'


class Console:
  """``log.txt`` plus the terminal: a one-line progress bar on interactive terminals (``stream.isatty()``),
  the periodic log lines otherwise. Rates exclude the first step (it includes compilation)."""

  def __init__(self, workdir: str, stream: TextIO | None = None, interactive: bool | None = None):
    os.makedirs(workdir, exist_ok=True)
    self.stream = stream or sys.stderr
    self.interactive = self.stream.isatty() if interactive is None else interactive
    self.file = open(path(workdir, LOG), 'a', encoding='utf-8')
    self._bar = False
    self._start = None  # (time, step) after the first step

  def log(self, message: str, terminal: bool = True) -> None:
    """A timestamped line in log.txt; also on the terminal when ``terminal``."""
    self.file.write(f'{time.strftime("%Y-%m-%d %H:%M:%S")} {message}\n')
    self.file.flush()
    if terminal:
      self._clear_bar()
      self.stream.write(message + '\n')
      self.stream.flush()

  def rate(self, step: int) -> tuple[float, float]:
    """Steps per second since the first timed step, and the seconds elapsed (0 before two steps)."""
    now = time.time()
    if self._start is None:
      self._start = (now, step)
      return 0.0, 0.0
    elapsed = now - self._start[0]
    return ((step - self._start[1]) / elapsed if elapsed > 0 else 0.0), elapsed

  def eta(self, step: int, total: int) -> str:
    rate, _ = self.rate(step)
    return f'{rate:.2f} steps/s, ETA {_duration((total - step) / rate)}' if rate > 0 else 'compiling...'

  def progress(self, step: int, total: int, text: str) -> None:
    """Redraws the progress bar (interactive terminals only)."""
    if not self.interactive:
      return
    width = 24
    done = int(width * step / max(total, 1))
    line = f'\r[{"#" * done}{"." * (width - done)}] {step}/{total} {self.eta(step, total)} | {text}'
    self.stream.write(line[:160])
    self.stream.flush()
    self._bar = True

  def _clear_bar(self) -> None:
    if self._bar:
      self.stream.write('\r\033[K')
      self._bar = False

  def close(self) -> None:
    self._clear_bar()
    self.file.close()


# ------------------------------------------------------------------------------------------------
# Metric writers.
# ------------------------------------------------------------------------------------------------
def _tensorboard_writer(workdir: str):
  """clu's TensorBoard writer when TensorFlow is installed, else None (clu's writers import TensorFlow)."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top (optional: needs TensorFlow)
  except ImportError:
    return None
  return metric_writers.SummaryWriter(workdir)


def _step_of(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a line cut short by a killed process."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return None


class MetricWriter:
  """Scalars to ``metrics.jsonl`` (always) and TensorBoard event files (when available).

  ``resume_step``: records of steps after it (written by an interrupted run after its last checkpoint)
  are dropped from metrics.jsonl.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.filename = path(workdir, METRICS)
    if resume_step and os.path.isfile(self.filename):
      with open(self.filename, encoding='utf-8') as f:
        kept = [line for line in f if _step_of(line) is not None and _step_of(line) <= resume_step]
      _atomic_write(self.filename, lambda f: f.write(''.join(kept).encode()))
    elif not resume_step and os.path.isfile(self.filename):
      os.remove(self.filename)
    self.file = open(self.filename, 'a', encoding='utf-8')
    self.tensorboard = _tensorboard_writer(workdir)

  def write(self, step: int, scalars: Mapping[str, float], **fields) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.file.write(json.dumps({'step': int(step), **fields, **scalars}) + '\n')
    self.file.flush()
    if self.tensorboard is not None:
      self.tensorboard.write_scalars(int(step), scalars)

  def close(self) -> None:
    self.file.close()
    if self.tensorboard is not None:
      self.tensorboard.close()
