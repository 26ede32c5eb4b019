"""Parameter and MAC counts against the published figures, and the describe command."""
import json
import subprocess
import sys

import numpy as np
import pytest

from jaxnas import analysis, describe, genotypes, networks, search_space


def _zoo(shared_dir):
  return json.loads((shared_dir / 'reference' / 'genotype_zoo.json').read_text())


def test_describe_json_matches_every_zoo_genotype(shared_dir, capsys):
  for name, entry in _zoo(shared_dir).items():
    e = entry['eval_network']
    argv = [name, '--init-channels', str(e['init_channels']), '--layers', str(e['layers']),
            '--num-classes', str(e['num_classes']), '--json'] + (['--auxiliary'] if e['auxiliary'] else [])
    assert describe.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out['params'] == entry['params_excluding_aux'], name
    assert out['params_including_aux'] == entry['params_including_aux'], name
    assert abs(out['macs'] / entry['macs_conv_linear'] - 1) < 0.005, name


def test_dsara_at_36_channels(shared_dir):
  # genotype_zoo.json note: "at init_channels=36: params 1533718, MACs 423.80M"
  net = networks.EvalNetwork(genotypes.get('DSARA'), 36, 20, 10)
  assert analysis.count_params(net) == 1533718
  assert round(analysis.count_macs(net) / 1e6, 2) == 423.80


def test_counts_by_hand_on_a_tiny_network():
  """C=2, 3 layers: count every conv, BN and linear weight by hand from the NetworkCIFAR structure."""
  g = genotypes.Genotype.from_dict({'normal': [['skip_connect', 0], ['skip_connect', 1]] * 4,
                                    'reduce': [['max_pool_3x3', 0], ['max_pool_3x3', 1]] * 4})
  net = networks.EvalNetwork(g, init_channels=2, layers=3, num_classes=10)
  # stem: conv 3->6 (3x3) + BN(6). cell0 normal C=2: pre0 6->2 + BN, pre1 6->2 + BN. cell1 reduce C=4:
  # pre0 6->4, pre1 8->4 (+BN each). cell2 reduce C=8 (layers//3 = 1, 2*layers//3 = 2): pre0 FR 8->8
  # (two 8->4 1x1) + BN(8), pre1 16->8 + BN. classifier 32->10.
  expected = (3 * 3 * 3 * 6 + 12) + (6 * 2 + 4) * 2 + (6 * 4 + 8) + (8 * 4 + 8) + (2 * 8 * 4 + 16) + \
             (16 * 8 + 16) + (32 * 10 + 10)
  assert analysis.count_params(net) == expected
  h = w = 32
  macs = h * w * 6 * 27 + 2 * h * w * 6 * 2 + (h * w * 6 * 4 + h * w * 8 * 4) + \
      (16 * 16 * 8 * 8 + 16 * 16 * 16 * 8) + 32 * 10
  assert analysis.count_macs(net) == macs


@pytest.mark.parametrize('groups,c_out', [(1, 12), (8, 8)])
def test_jaxpr_macs_of_a_training_step(groups, c_out):
  """The FLOP count of the GPU benchmarks: a conv's gradient w.r.t. input and weights costs two more passes
  of its forward MACs (dense and depthwise), and a scanned body counts ``length`` times."""
  import jax  # pylint: disable=g-import-not-at-top
  x, w = np.ones((4, 16, 16, 8), np.float32), np.ones((3, 3, 8 // groups, c_out), np.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2, feature_group_count=groups,
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  forward = 4 * 16 * 16 * c_out * 9 * (8 // groups)   # output elements x (k*k*c_in/groups)
  assert analysis.jaxpr_macs(jax.make_jaxpr(conv)(x, w).jaxpr) == forward
  step = jax.grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1))
  assert analysis.jaxpr_macs(jax.make_jaxpr(step)(x, w).jaxpr) == 3 * forward
  if groups == 8:
    scanned = lambda x, w: jax.lax.scan(lambda h, _: (conv(h, w), None), x, None, length=5)[0]
    scanned_step = jax.grad(lambda x, w: scanned(x, w).sum(), argnums=(0, 1))
    assert analysis.jaxpr_macs(jax.make_jaxpr(scanned_step)(x, w).jaxpr) == 15 * forward


def test_scans_over_known_flags_count_the_branches_taken_up_to_a_length():
  """Constant per-iteration flags pick each iteration's branch (the supernet's inactive edges) in scans of up
  to ``_UNROLL_LENGTH`` iterations; a longer one (CROWN's loop over row chunks) counts its larger branch
  ``length`` times instead of folding every iteration."""
  import jax  # pylint: disable=g-import-not-at-top

  def f(w, x, flags):
    body = lambda h, on: (jax.lax.cond(on, lambda h: h @ w, lambda h: h, h), None)
    return jax.lax.scan(body, x, flags)[0]

  for length, on in [(analysis._UNROLL_LENGTH, 3), (analysis._UNROLL_LENGTH + 1, analysis._UNROLL_LENGTH + 1)]:
    flags = np.arange(length) < 3
    jaxpr = jax.make_jaxpr(lambda w, x: f(w, x, flags))(np.ones((4, 4), np.float32), np.ones((2, 4), np.float32))
    assert analysis.jaxpr_macs(jaxpr) == on * 2 * 4 * 4


def test_scan_without_operand_counts_counts_its_body_length_times():
  """jax versions whose scan does not record ``num_consts`` (0.11): the body, inputs unknown, ``length`` times."""
  import jax  # pylint: disable=g-import-not-at-top
  f = lambda w, x: jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=5)[0]
  jaxpr = jax.make_jaxpr(f)(np.ones((4, 4), np.float32), np.ones((2, 4), np.float32)).jaxpr
  (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == 'scan']
  params = {k: v for k, v in eqn.params.items() if k not in ('num_consts', 'num_carry')}
  assert analysis._scan_macs(params, [None] * len(eqn.invars)) == 5 * 2 * 4 * 4
  assert analysis.jaxpr_macs(jaxpr) == 5 * 2 * 4 * 4


def test_supernet_counts_every_op():
  net = search_space.Supernet(init_channels=4, layers=5)
  alphas = net.init_alphas(np.random.default_rng(0).integers(0, 2**31, 2, dtype=np.uint32))
  assert analysis.count_macs(net, alphas=alphas) > analysis.count_macs(
      networks.EvalNetwork(genotypes.get('DARTS_V2'), 4, 5))
  assert analysis.count_params(net) > 0


def test_console_command_and_errors():
  out = subprocess.run([sys.executable, '-m', 'jaxnas.describe', 'DARTS_V2', '--json'], capture_output=True,
                       text=True, check=True)
  assert json.loads(out.stdout)['params'] == 3349342
  bad = subprocess.run([sys.executable, '-m', 'jaxnas.describe', 'NOT_A_GENOTYPE'], capture_output=True,
                       text=True)
  assert bad.returncode == 2 and "unknown genotype 'NOT_A_GENOTYPE'" in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('name', ['DARTS_V2', 'DSARA'])
def test_count_params_accepts_variables(name):
  net = networks.EvalNetwork(genotypes.get(name), 8, 5, auxiliary=True)
  variables = net.init(np.zeros(2, np.uint32), np.zeros((1, 32, 32, 3), np.float32))
  assert analysis.count_params(variables) == analysis.count_params(net)
  assert analysis.count_params(variables, include_aux=True) > analysis.count_params(variables)
