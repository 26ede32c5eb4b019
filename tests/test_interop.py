"""PyTorch state_dict import/export: round trips, layouts and clear errors."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxnas import genotypes, interop, networks, search_space


def _nets():
  return [networks.EvalNetwork(genotypes.get('PDARTS'), 4, 5, auxiliary=True),
          networks.EvalNetwork(genotypes.get('DSARA'), 4, 5),
          search_space.Supernet(init_channels=2, layers=4),
          search_space.Supernet(space=search_space.DSARA, init_channels=2, layers=3)]


@pytest.mark.parametrize('net', _nets(), ids=['eval', 'dsara_eval', 'supernet', 'dsara_supernet'])
def test_round_trip_through_torch_names(net):
  v = net.init(jax.random.PRNGKey(3), np.zeros((1, 32, 32, 3), np.float32))
  sd = interop.to_torch_state_dict(v, net)
  assert all(k.split('.')[0] in {'stem', 'cells', 'classifier', 'auxiliary_head'} for k in sd)
  back = interop.from_torch_state_dict(sd, net)
  for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_names_and_layouts_match_the_original(shared_dir):
  """Every key of the original state dicts maps to exactly one leaf, with the PyTorch shape."""
  cases = [('darts_v2_eval_network', networks.EvalNetwork(genotypes.get('DARTS_V2'), 8, 5, auxiliary=True)),
           ('darts_search_supernet', search_space.Supernet(init_channels=4, layers=5))]
  for name, net in cases:
    original = interop.load_state_dict(shared_dir / 'fixtures' / f'{name}.npz')
    exported = interop.to_torch_state_dict(net.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3))), net)
    expected = {k: v.shape for k, v in original.items() if not k.endswith('num_batches_tracked')}
    assert {k: v.shape for k, v in exported.items()} == expected


def test_errors_are_one_clear_line(tmp_path):
  net = networks.EvalNetwork(genotypes.get('DARTS_V2'), 4, 5)
  sd = interop.to_torch_state_dict(net.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3))), net)
  missing = dict(sd)
  del missing['classifier.bias']
  with pytest.raises(ValueError, match="lacks 'classifier.bias'"):
    interop.from_torch_state_dict(missing, net)
  wrong = dict(sd, **{'classifier.weight': np.zeros((10, 7))})
  with pytest.raises(ValueError, match="shape mismatch for 'classifier.weight'"):
    interop.from_torch_state_dict(wrong, net)
  with pytest.raises(ValueError, match="lacks 'cells.0._ops.5.op.3.running_mean'"):
    interop.from_torch_state_dict(sd, networks.EvalNetwork(genotypes.get('DARTS_V1'), 4, 5))
  with_aux = networks.EvalNetwork(genotypes.get('DARTS_V2'), 4, 5, auxiliary=True)
  sd_aux = interop.to_torch_state_dict(with_aux.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3))), with_aux)
  with pytest.raises(ValueError, match="does not use \\(first: 'auxiliary_head"):
    interop.from_torch_state_dict(sd_aux, net)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    interop.from_torch_state_dict(tmp_path / 'nope.npz', net)
  np.savez(tmp_path / 'w.npz', **{f'state_dict/{k}': v for k, v in sd.items()})
  loaded = interop.from_torch_state_dict(tmp_path / 'w.npz', net, dtype=jnp.float32)
  assert loaded['params']['classifier']['kernel'].shape == (64, 10)


def test_a_wrong_tensor_inside_a_stacked_supernet_leaf_is_named():
  """A stage stacks many PyTorch tensors into one leaf: the error names the one whose shape differs."""
  net = search_space.Supernet(init_channels=2, layers=8)
  assert net.stage_cells[0] == [0, 1]
  sd = interop.to_torch_state_dict(net.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3))), net)
  name = 'cells.1._ops.3._ops.4.op.1.weight'  # cell 1 (a stage's second normal cell), edge 3, sep_conv_3x3 dw1
  assert sd[name].shape == (2, 1, 3, 3)
  with pytest.raises(ValueError, match=f"shape mismatch for '{name}': state dict has \\(2, 1, 5, 5\\)"):
    interop.from_torch_state_dict(dict(sd, **{name: np.zeros((2, 1, 5, 5))}), net)


def test_torch_module_and_pt_file(tmp_path):
  torch = pytest.importorskip('torch')
  net = networks.EvalNetwork(genotypes.get('DARTS_V2'), 4, 5)
  sd = interop.to_torch_state_dict(net.init(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3))), net)
  tensors = {'module.' + k: torch.tensor(v) for k, v in sd.items()}  # DataParallel prefix
  torch.save({'state_dict': tensors}, tmp_path / 'w.pt')
  v = interop.from_torch_state_dict(tmp_path / 'w.pt', net)
  np.testing.assert_array_equal(v['params']['classifier']['bias'], sd['classifier.bias'])
