"""Evaluation-network train step: ``jaxnas.train.train_step`` (the step of ``config.mode=train``), standard or
PGD-k adversarial training, against the same SGD step of the PyTorch reference.

DARTS_V2 NetworkCIFAR, C=36, 20 cells, batch 64, 32x32x3 by default. The loss is CE(logits) + 0.4 * CE(aux
logits) (DARTS' auxiliary weight) with train-mode BatchNorm, then SGD (momentum 0.9, weight decay 3e-4,
gradient norm clipped to 5). ``--pgd-steps 7`` is Madry adversarial training: PGD-7 (l_inf, eps 8/255, step
2/255) against the network in inference mode, then the same step on the adversarial examples. No augmentation
and no random start, so both sides compute the same function from the same weights (PyTorch's, imported with
``jaxnas.interop``) and uint8 batch: ``loss_abs_diff`` checks it (only without drop-path, whose random masks
differ between the two). On a GPU PyTorch runs on the same GPU (``common.torch_device``).

``flops_per_step`` counts the convolutions and matrix products of the whole step (attack included) from its
jaxpr, scanned cells ``length`` times (``common.step_flops``); ``xla_flops_per_step`` is XLA's cost analysis,
which counts a loop body once.

  python -m benchmarks.eval_train_step
  python -m benchmarks.eval_train_step --pgd-steps 7        # PGD-7 adversarial training step
  python -m benchmarks.eval_train_step --genotype DSARA --channels 64
  python -m benchmarks.eval_train_step --quick
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxnas import bilevel, genotypes, interop, networks, ops, train

AUX_WEIGHT = 0.4
COLUMNS = ('genotype', 'layers', 'batch', 'C', 'pgd_steps', 'compile_s', 'step_s', 'examples_per_s',
           'torch_step_s', 'ratio', 'loss_abs_diff', 'fraction_of_peak_flops', 'peak_memory_bytes')


def make_recipe(net, pgd_steps: int, eps: float) -> train.Recipe:
  """The training recipe of ``train.train_step``: DARTS' SGD, no augmentation, PGD-k without random start."""
  adversary = None
  if pgd_steps:
    adversary = train.Adversary(method='pgd', eps=eps, step_size=eps / 4, steps=pgd_steps, random_start=False,
                                attack_mode='eval')
  return train.Recipe(net=net, optim=bilevel.WeightOptim(), augment=bilevel.Augment(), auxiliary_weight=AUX_WEIGHT,
                      adversary=adversary)


def torch_setup(torch, genotype, C, layers, drop_path_prob, pgd_steps, eps, images_nchw, y, device):
  """The reference NetworkCIFAR (on ``device``) and its train step: PGD-k in eval mode when ``pgd_steps``,
  forward + backward in train mode, gradient clipping, SGD."""
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  F = torch.nn.functional
  torch.manual_seed(0)
  model = torch_reference.EvalNetwork(genotype.to_dict(), C=C, num_classes=10, layers=layers, auxiliary=True)
  model = model.to(device)
  model.drop_path_prob = drop_path_prob
  optimizer = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
  x = torch.from_numpy(images_nchw).to(device).float() / 255.0
  y = torch.from_numpy(y).to(device)

  def pgd():
    model.eval()
    delta = torch.zeros_like(x)
    for _ in range(pgd_steps):
      delta.requires_grad_(True)
      g, = torch.autograd.grad(F.cross_entropy(model(torch.clamp(x + delta, 0, 1))[0], y), delta)
      delta = torch.clamp(delta.detach() + eps / 4 * g.sign(), -eps, eps)
    return torch.clamp(x + delta, 0, 1).detach()

  def step():
    inputs = pgd() if pgd_steps else x
    model.train()
    optimizer.zero_grad(set_to_none=True)
    logits, logits_aux = model(inputs)
    loss = F.cross_entropy(logits, y) + AUX_WEIGHT * F.cross_entropy(logits_aux, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    return loss.detach()

  return model, step


def run(args, torch) -> dict:
  B, C, L = args.batch, args.channels, args.layers
  genotype = genotypes.get(args.genotype)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (B, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, B).astype(np.int32)
  net = networks.EvalNetwork(genotype, init_channels=C, layers=L, num_classes=10, auxiliary=True,
                             depthwise=args.depthwise)
  recipe = make_recipe(net, args.pgd_steps, args.eps)
  result = {'benchmark': 'eval_train_step', 'genotype': args.genotype, 'layers': L, 'batch': B, 'C': C,
            'drop_path_prob': args.drop_path, 'pgd_steps': args.pgd_steps, 'eps': args.eps,
            'depthwise': ops.resolve_depthwise(args.depthwise)}
  if torch is not None:
    device = common.torch_device(torch)
    model, t_step = torch_setup(torch, genotype, C, L, args.drop_path, args.pgd_steps, args.eps,
                                images.transpose(0, 3, 1, 2).copy(), labels.astype(np.int64), device)
    variables = interop.from_torch_state_dict(model.state_dict(), net, input_shape=images.shape)
  else:
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros(images.shape, jnp.float32))
  params = variables['params']
  state = train.TrainState(params=params, batch_stats=variables['batch_stats'],
                           opt_state=bilevel.weight_optimizer(recipe.optim, 0.0).init(params),
                           step=jnp.zeros((), jnp.int32), rng=jax.random.key(0))
  step_args = (state, {'image': jnp.asarray(images), 'label': jnp.asarray(labels)},
               {'lr': jnp.float32(0.025), 'drop_path_prob': jnp.float32(args.drop_path)})
  step = lambda *a: train.train_step(recipe, *a)
  timing = common.time_jax(step, step_args, args.repeats, args.warmup, trace_dir=args.trace)
  _, metrics = timing.pop('outputs')
  result.update(timing, examples_per_s=B / timing['step_s'])
  if torch is not None:
    torch_loss = float(t_step())
    result['loss_abs_diff'] = abs(float(metrics['train/loss']) - torch_loss) if args.drop_path == 0 else None
    result.update(common.time_torch(torch, t_step, args.repeats, args.warmup, args.torch_threads, device))
    result['ratio'] = result['step_s'] / result['torch_step_s']
  return result


def main(argv=None):
  p = common.parser(__doc__.split('\n')[0])
  p.add_argument('--genotype', default='DARTS_V2', help='zoo genotype name')
  p.add_argument('--layers', type=int, default=20)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--channels', type=int, default=36, help='init channels C')
  p.add_argument('--drop-path', type=float, default=0.0, help='drop-path probability (DARTS ramps to 0.2)')
  p.add_argument('--pgd-steps', type=int, default=0, help='PGD steps of adversarial training (0: standard)')
  p.add_argument('--eps', type=float, default=8 / 255, help='l_inf radius of the training attack')
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.channels, args.layers, args.repeats, args.warmup = 2, 8, 5, 1, 0
  torch = common.torch_or_none(args)
  info = common.machine_info()
  result = dict(run(args, torch), machine=info)
  common.finish([result], args, COLUMNS)
  return [result]


if __name__ == '__main__':
  main()
