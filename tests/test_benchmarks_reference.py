"""The PyTorch reference models of ``benchmarks/torch_reference.py`` against the original code's fixtures.

Each fixture's ``state_dict`` is loaded by name into the reference (float64) and its outputs must match the
original PyTorch outputs within 1e-9; parameter counts must equal the published ones of the genotype zoo.
"""
import json
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import torch_reference as tr  # pylint: disable=g-import-not-at-top

RTOL = 1e-9


@pytest.fixture(autouse=True, scope='module')
def _one_torch_thread():
  """One intra-op thread: on a busy 2-core machine OpenMP spinning makes tiny models ~10x slower."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _close(actual, expected):
  actual = actual.detach().numpy() if hasattr(actual, 'detach') else np.asarray(actual)
  np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def _zoo(shared_dir):
  return json.loads((shared_dir / 'reference' / 'genotype_zoo.json').read_text())


def _load(model, shared_dir, name):
  """Loads a fixture's state dict by name; the keys must be exactly the model's (less num_batches_tracked)."""
  data = np.load(shared_dir / 'fixtures' / name)
  sd = {k[len('state_dict/'):]: torch.from_numpy(data[k]) for k in data.files if k.startswith('state_dict/')}
  ours = {k for k in model.state_dict() if not k.endswith('num_batches_tracked')}
  assert ours == set(sd), (sorted(ours - set(sd))[:3], sorted(set(sd) - ours)[:3])
  model.double().load_state_dict(sd, strict=False)
  return data


def _rewind_running_stats(model, x):
  """Undoes one train-mode update of every BN's running statistics by the batch ``x``.

  With momentum m, one update is r' = (1 - m) r + m b; a train forward with momentum -m / (1 - m) maps r'
  back to r. Needed for ``darts_v2_eval_network.npz``: its ``logits_eval`` was computed before the
  train-mode forward that produced ``logits_train``, its ``state_dict`` saved after it.
  """
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for bn in bns:
    bn.momentum = -bn.momentum / (1 - bn.momentum)
  model.train()
  with torch.no_grad():
    model(x)
  for bn in bns:
    bn.momentum = 0.1


def test_search_supernet_matches_fixture(shared_dir):
  net = tr.SearchNetwork(C=4, num_classes=10, layers=5)
  data = _load(net, shared_dir, 'darts_search_supernet.npz')
  x = torch.from_numpy(data['input_nchw']).requires_grad_()
  alphas = {t: torch.from_numpy(data[f'alphas_{t}']).requires_grad_() for t in ('normal', 'reduce')}
  net.train()
  logits = net(x, alphas)
  loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(data['labels']))
  loss.backward()
  _close(logits, data['logits_train'])
  _close(loss, data['loss'])
  _close(alphas['normal'].grad, data['grad_alphas_normal'])
  _close(alphas['reduce'].grad, data['grad_alphas_reduce'])
  _close(x.grad, data['grad_input_nchw'])


def test_darts_v2_eval_network_matches_fixture(shared_dir):
  net = tr.EvalNetwork(_zoo(shared_dir)['DARTS_V2']['genotype'], C=8, num_classes=10, layers=5,
                       auxiliary=True)
  data = _load(net, shared_dir, 'darts_v2_eval_network.npz')
  x = torch.from_numpy(data['input_nchw'])
  net.train()
  with torch.no_grad():
    logits, logits_aux = net(x)
  _close(logits, data['logits_train'])
  _close(logits_aux, data['logits_aux_train'])
  _load(net, shared_dir, 'darts_v2_eval_network.npz')
  _rewind_running_stats(net, x)
  net.eval()
  with torch.no_grad():
    logits, logits_aux = net(x)
  assert logits_aux is None
  _close(logits, data['logits_eval'])


def test_dsara_eval_network_matches_fixture(shared_dir):
  genotype = _zoo(shared_dir)['DSARA']['genotype']
  net = tr.EvalNetwork(genotype, C=8, num_classes=10, layers=5, auxiliary=True)
  data = _load(net, shared_dir, 'dsara_arnas_eval_network.npz')
  net.eval()
  with torch.no_grad():
    logits, _ = net(torch.from_numpy(data['input_nchw']))
  _close(logits, data['logits_eval'])


def test_parameter_counts_match_genotype_zoo(shared_dir):
  for name, entry in _zoo(shared_dir).items():
    cfg = entry['eval_network']
    net = tr.EvalNetwork(entry['genotype'], C=cfg['init_channels'], num_classes=cfg['num_classes'],
                         layers=cfg['layers'], auxiliary=cfg['auxiliary'])
    assert tr.count_params(net) == entry['params_excluding_aux'], name
    assert sum(p.numel() for p in net.parameters()) == entry['params_including_aux'], name


def test_drop_path_scales_kept_samples_and_zeroes_dropped():
  torch.manual_seed(0)
  x = torch.ones(4000, 1, 1, 1, dtype=torch.float64)
  y = tr.drop_path(x, 0.25).flatten()
  assert set(y.unique().tolist()) <= {0.0, 1 / 0.75}
  assert abs((y > 0).double().mean().item() - 0.75) < 0.03


def test_dsara_search_network_has_three_alpha_tensors():
  net = tr.SearchNetwork(C=4, layers=5, primitives=tr.DSARA_PRIMITIVES, layout=tr.DSARA_LAYOUT)
  alphas = net.new_alphas(torch.Generator().manual_seed(0))
  assert {t: tuple(a.shape) for t, a in alphas.items()} == {t: (14, 7) for t in ('accurate', 'reduce', 'robust')}
  assert [c.cell_type for c in net.cells] == ['accurate', 'reduce', 'accurate', 'reduce', 'robust']
  logits = net(torch.rand(2, 3, 16, 16), alphas)
  logits.sum().backward()
  assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in alphas.values())
