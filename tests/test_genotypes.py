"""Genotype type, JSON round trip, validation errors, derivation rule and the zoo."""
import json

import numpy as np
import pytest

from jaxnas import genotypes, ops


@pytest.mark.parametrize('name', list(genotypes.ZOO))
def test_zoo_json_round_trip(name):
  g = genotypes.get(name)
  again = genotypes.Genotype.from_json(g.to_json())
  assert again == g and hash(again) == hash(g)
  assert json.loads(g.to_json()) == g.to_dict()


def test_zoo_matches_published_genotypes(shared_dir):
  zoo = json.loads((shared_dir / 'reference' / 'genotype_zoo.json').read_text())
  assert set(zoo) == set(genotypes.ZOO)
  for name, entry in zoo.items():
    assert genotypes.get(name).to_dict() == entry['genotype'], name


def test_attribute_access_like_the_original():
  g = genotypes.get('DARTS_V2')
  assert g.normal[0] == ('sep_conv_3x3', 0) and g.reduce_concat == (2, 3, 4, 5)
  assert genotypes.get('DSARA').cell_types == ('accurate', 'reduce', 'robust')
  with pytest.raises(AttributeError):
    g.robust  # pylint: disable=pointless-statement


def test_immutable():
  g = genotypes.get('DARTS_V1')
  with pytest.raises(AttributeError):
    g.cells = ()


def _with(cell_edges):
  d = genotypes.get('DARTS_V2').to_dict()
  d['normal'] = cell_edges
  return json.dumps(d)


@pytest.mark.parametrize('edges, message', [
    ([['sep_conv_9x9', 0]] + [['skip_connect', 0]] * 7, "unknown operation 'sep_conv_9x9'"),
    ([['none', 0]] + [['skip_connect', 0]] * 7, "unknown operation 'none'"),
    ([['skip_connect', 0], ['skip_connect', 2]] + [['skip_connect', 0]] * 6, 'reads state 2, out of range'),
    ([['skip_connect', 0]] * 7, 'has 7 edges'),
    ([['skip_connect', 0]] * 6 + [['skip_connect', 5], ['skip_connect', 0]], 'reads state 5'),
    ([['skip_connect']] * 8, 'list of \\[op, input_index\\] pairs'),
])
def test_bad_genotypes_raise_one_clear_error(edges, message):
  with pytest.raises(ValueError, match=message) as info:
    genotypes.Genotype.from_json(_with(edges))
  assert '\n' not in str(info.value)


def test_bad_json_and_unknown_names():
  with pytest.raises(ValueError, match='does not parse'):
    genotypes.Genotype.from_json('{"normal": [')
  with pytest.raises(ValueError, match="unknown genotype 'NOPE'"):
    genotypes.get('NOPE')
  with pytest.raises(ValueError, match=r"genotype file 'NOPE.json' not found \(resolved to .*NOPE.json\): give an"):
    genotypes.load('NOPE.json')


def test_a_damaged_genotype_file_is_named(tmp_path):
  (tmp_path / 'g.json').write_text('{"normal": [')
  with pytest.raises(ValueError, match=r'g.json: genotype JSON does not parse'):
    genotypes.load(tmp_path / 'g.json')


def test_a_workdir_without_a_genotype(tmp_path):
  with pytest.raises(ValueError, match=r'holds no genotype.json: finish the search there first \(rerun its command'):
    genotypes.load(tmp_path)


def test_load_from_file_and_workdir(tmp_path):
  g = genotypes.get('PDARTS')
  (tmp_path / 'genotype.json').write_text(g.to_json())
  assert genotypes.load(tmp_path / 'genotype.json') == g
  assert genotypes.load(tmp_path) == g


def _brute_force_parse(alphas, primitives, steps=4):
  """An independent statement of the rule: rank edges by max non-'none' softmax weight."""
  w = np.exp(alphas) / np.exp(alphas).sum(-1, keepdims=True)
  keep = [k for k, p in enumerate(primitives) if p != 'none']
  edges, start = [], 0
  for i in range(steps):
    rows = w[start:start + i + 2]
    scores = [(-max(rows[j][k] for k in keep), j) for j in range(i + 2)]
    for _, j in sorted(scores)[:2]:
      k = max(keep, key=lambda k: (rows[j][k], -k))
      edges.append([primitives[k], j])
    start += i + 2
  return edges


@pytest.mark.parametrize('primitives', [ops.DARTS_PRIMITIVES, ops.DSARA_PRIMITIVES])
def test_derive_matches_brute_force(primitives):
  rng = np.random.default_rng(0)
  for _ in range(20):
    alphas = {'normal': rng.normal(size=(14, len(primitives))), 'reduce': rng.normal(size=(14, len(primitives)))}
    g = genotypes.derive(alphas, primitives)
    for t in alphas:
      assert [list(e) for e in g[t]] == _brute_force_parse(alphas[t], primitives)
      assert g.concat_of(t) == (2, 3, 4, 5)


def test_derive_never_picks_none_even_when_it_dominates():
  a = np.zeros((14, 8))
  a[:, 0] = 10.0  # 'none' dominates every edge
  a[3, 5] = 1.0
  g = genotypes.derive({'normal': a, 'reduce': a}, ops.DARTS_PRIMITIVES)
  assert all(op != 'none' for op, _ in g.normal)
  assert ('sep_conv_5x5', 1) in g.normal  # edge 3 = node 1, input 1 ranks first on node 1
