"""Primitive operations of the DARTS family, NHWC, with the exact PyTorch semantics of the originals.

Every operation is a pair of pure functions ``init(rng, C, stride, affine, pool_bn) -> (params, stats)``
(``rng`` a numpy Generator, see ``numpy_rng``) and
``apply(params, stats, x, stride, train, depthwise) -> (y, new_stats)``. ``params`` and ``stats`` (BatchNorm
running statistics) are plain dicts; nothing is hidden in a module. Conv kernels are stored HWIO (Flax
layout), depthwise kernels as ``(k, k, 1, C)``.

Semantics (quark0/darts ``operations.py``): all convs bias-free; ``sep_conv_k`` = two stacked
[ReLU, depthwise k (stride on the first only, pad k//2), 1x1, BN]; ``dil_conv_k`` = [ReLU, depthwise k,
dilation 2, pad k-1, 1x1, BN]; ``avg_pool_3x3`` with ``count_include_pad=False``; ``skip_connect`` = identity
or ``FactorizedReduce`` at stride 2; ``none`` = zeros. In the search supernet pool ops are followed by
BN(affine=False) (``pool_bn=True``).

The depthwise convolution has two formulations with identical results: ``'shift'`` (a sum of k*k strided
slices times per-channel weights, fast on XLA:CPU and for the search supernet on GPU) and ``'grouped'``
(``lax.conv_general_dilated`` with ``feature_group_count``, vendor kernels on GPU/TPU). ``'auto'`` picks
by backend and network (``resolve_depthwise``). Under ``'shift'`` the 1x1 convs
and the train-mode BatchNorm of the composite ops also take hand-written VJPs (one product per gradient,
two reductions of the cotangent), which XLA:CPU compiles without the transposed copies autodiff makes.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BN_EPS = 1e-5
BN_MOMENTUM = 0.1

DARTS_PRIMITIVES = ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3',
                    'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
DSARA_PRIMITIVES = DARTS_PRIMITIVES[1:]


# ------------------------------------------------------------------------------------------------
# Building blocks.
# ------------------------------------------------------------------------------------------------
FORMULATIONS = ('shift', 'autodiff', 'grouped')


def resolve_depthwise(depthwise: str, supernet: bool = False) -> str:
  """The window-op formulation: 'shift' on CPU, and on GPU for a search ``supernet`` (its step ran 2x faster
  than with grouped convolutions on an H100: benchmarks/RESULTS.md); else 'grouped', unless given.

  'shift': shifted multiply-adds with hand-written VJPs whose backward pass is again a forward-style
  window sum, and hand-written VJPs for 1x1 convs and train-mode BatchNorm (fast on XLA:CPU; reverse mode
  of any order, no forward mode). 'autodiff': the same sums with plain JAX autodiff (every AD mode, e.g.
  ``jax.jvp`` for exact Hessian-vector products; slower gradients). 'grouped': ``feature_group_count``
  convolutions (vendor kernels on GPU/TPU; 'same'-padded dilated ones run undilated, ``_grouped_dilated_conv``).
  """
  if depthwise == 'auto':
    backend = jax.default_backend()
    return 'shift' if backend == 'cpu' or (supernet and backend == 'gpu') else 'grouped'
  if depthwise not in FORMULATIONS:
    raise ValueError(f"unknown depthwise formulation {depthwise!r}: use 'auto' or one of {FORMULATIONS}")
  return depthwise


def numpy_rng(rng) -> np.random.Generator:
  """A numpy generator seeded from a JAX PRNG key: initialising thousands of small weights eagerly in
  numpy takes milliseconds, where JAX dispatch (or compiling a jitted init) takes minutes."""
  if isinstance(rng, np.random.Generator):
    return rng
  data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def torch_uniform(rng: np.random.Generator, shape, fan_in):
  """PyTorch's default init for conv/linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return rng.uniform(-bound, bound, shape).astype(np.float32)


def conv_init(rng, k, c_in, c_out, groups=1):
  return {'kernel': torch_uniform(rng, (k, k, c_in // groups, c_out), k * k * c_in // groups)}


def bn_init(C, affine):
  params = {'scale': np.ones((C,), np.float32), 'bias': np.zeros((C,), np.float32)} if affine else {}
  return params, {'mean': np.zeros((C,), np.float32), 'var': np.ones((C,), np.float32)}


def batch_norm(params, stats, x, train, depthwise='autodiff'):
  """BatchNorm2d over N, H, W; train mode uses batch statistics and updates the running ones as PyTorch does
  (momentum 0.1, unbiased variance in the running estimate). Statistics and normalisation are computed in at
  least float32, the output has ``x``'s dtype (bfloat16 activations keep float32 running statistics).
  Under the 'shift' formulation the train-mode normalisation has a hand-written VJP (``_shift_normalize``)."""
  y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if train:
    normalize = _shift_normalize if resolve_depthwise(depthwise) == 'shift' else batch_normalize
    y, mean, var = normalize(y)
    n = x.size // x.shape[-1]
    new_stats = jax.tree.map(lax.stop_gradient, {
        'mean': (1 - BN_MOMENTUM) * stats['mean'] + BN_MOMENTUM * mean,
        'var': (1 - BN_MOMENTUM) * stats['var'] + BN_MOMENTUM * var * n / max(n - 1, 1)})
  else:
    new_stats = stats
    y = (y - stats['mean']) * lax.rsqrt(stats['var'] + BN_EPS)
  if params:
    y = y * params['scale'] + params['bias']
  return y.astype(x.dtype), new_stats


def batch_normalize(y):
  """(y - mean) / sqrt(var + eps) with the batch mean and biased variance over N, H, W; also returns both."""
  mean = jnp.mean(y, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(y - mean), axis=(0, 1, 2))
  return (y - mean) * lax.rsqrt(var + BN_EPS), mean, var


_shift_normalize = jax.custom_vjp(batch_normalize)


def _shift_normalize_fwd(y):
  out = batch_normalize(y)
  return out, (y, out[1], out[2])


def _shift_normalize_bwd(res, cotangents):
  """dy = rstd (g - mean(g) - xhat mean(g xhat)) + (g_mean + 2 g_var (y - mean)) / n: two reductions of the
  cotangent, where autodiff of the forward pass differentiates every intermediate."""
  y, mean, var = res
  g, g_mean, g_var = cotangents
  n = y.size // y.shape[-1]
  rstd = lax.rsqrt(var + BN_EPS)
  xhat = (y - mean) * rstd
  mean_g = jnp.mean(g, axis=(0, 1, 2))
  mean_gx = jnp.mean(g * xhat, axis=(0, 1, 2))
  return (rstd * (g - mean_g - xhat * mean_gx) + (g_mean + 2 * g_var * (y - mean)) / n,)


_shift_normalize.defvjp(_shift_normalize_fwd, _shift_normalize_bwd)


def conv2d(x, kernel, stride=1, padding=0, dilation=1):
  """Dense conv, NHWC/HWIO, symmetric PyTorch padding."""
  if kernel.shape[0] == 1 and kernel.shape[1] == 1 and padding == 0:
    return jnp.einsum('bhwc,cd->bhwd', x[:, ::stride, ::stride, :], kernel[0, 0])
  return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                  rhs_dilation=(dilation, dilation),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@jax.custom_vjp
def _shift_pointwise(x, kernel):
  return jnp.einsum('nc,cd->nd', x, kernel)


def _shift_pointwise_fwd(x, kernel):
  return _shift_pointwise(x, kernel), (x, kernel)


def _shift_pointwise_bwd(res, g):
  x, kernel = res
  return jnp.einsum('nd,cd->nc', g, kernel), jnp.einsum('nc,nd->cd', x, g)


_shift_pointwise.defvjp(_shift_pointwise_fwd, _shift_pointwise_bwd)


def pointwise_conv2d(x, kernel, depthwise):
  """1x1 stride-1 conv; under 'shift' a (b*h*w, c) x (c, d) product whose gradients are one product each."""
  if resolve_depthwise(depthwise) == 'shift':
    b, h, w, c = x.shape
    return _shift_pointwise(x.reshape(b * h * w, c), kernel[0, 0]).reshape(b, h, w, -1)
  return conv2d(x, kernel)


def _out_size(size, k, stride, padding, dilation=1):
  return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _taps(k, dilation):
  """The (row, column) offsets of the k*k kernel taps."""
  return [(i * dilation, j * dilation) for i in range(k) for j in range(k)]


def _window(xp, offset, stride, out_hw):
  """The strided view of a padded NHWC input at a static tap offset."""
  (i, j), b, c = offset, xp.shape[0], xp.shape[3]
  return lax.slice(xp, (0, i, j, 0), (b, i + (out_hw[0] - 1) * stride + 1, j + (out_hw[1] - 1) * stride + 1, c),
                   (1, stride, stride, 1))


def _window_sum(xp, w, stride, dilation, out_hw):
  """y = sum_t window_t(xp) * w[t] for per-channel tap weights ``w`` of shape (k, k, C): unrolled static
  slices, which XLA fuses into one loop reading the input once (a ``lax.scan`` over taps would write the
  accumulator back to memory at every tap)."""
  k = w.shape[0]
  terms = [_window(xp, (i, j), stride, out_hw) * w[i // dilation, j // dilation] for i, j in _taps(k, dilation)]
  return functools.reduce(operator.add, terms)


def _spread(g, k, stride, dilation, padded_hw):
  """Places the cotangent g (B, Ho, Wo, C) at the window origins: G[e + i*stride] = g[i], zeros elsewhere,
  with e = (k-1)*dilation, so that the adjoint of the window map is a stride-1 window sum over G."""
  e = (k - 1) * dilation
  rem = [p - (n - 1) * stride - 1 for p, n in zip(padded_hw, g.shape[1:3])]
  return lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (e, e + rem[0], stride - 1),
                                             (e, e + rem[1], stride - 1), (0, 0, 0)))


def _tap_weight_grad(xp, g, k, stride, dilation):
  """dw[i, j, c] = sum_{b, y, x} g[b, y, x, c] * xp[b, i*d + s*y, j*d + s*x, c] (k, k, C).

  One variadic reduction with k*k outputs over each image's positions: XLA emits a single loop over g that
  reads each input window once and keeps k*k accumulators per (image, channel), where k*k separate
  reductions (or per-row matrix products, which need channel-major copies of g) read g k*k times; the
  per-image sums are then added. Reducing over the batch inside the loop too ran 2-4x slower at 36 channels.
  Sums in at least float32 (bfloat16 cotangents).
  """
  accumulate = jnp.promote_types(g.dtype, jnp.float32)
  g = g.astype(accumulate)
  products = tuple(_window(xp, t, stride, g.shape[1:3]).astype(accumulate) * g for t in _taps(k, dilation))
  zero = np.zeros((), accumulate)
  per_image = lax.reduce(products, (zero,) * len(products),
                         lambda a, b: tuple(u + v for u, v in zip(a, b)), (1, 2))
  return jnp.stack(per_image).sum(axis=1).reshape(k, k, -1).astype(xp.dtype)


def fusion_barrier(tree, probe):
  """``tree`` unchanged, computed into its own buffers before its consumers run.

  XLA:CPU otherwise fuses a window op's gradient, or the max-pool's tap indices, into the loops that read
  them at k*k shifted positions, and recomputes them at every one (several times slower; see
  benchmarks/RESULTS.md). A conditional is a fusion boundary. Its predicate ``(bits(probe) | 1) != 0`` is
  always true but depends on the data, so XLA can fold neither it nor the never-taken branch away.
  """
  bits = lax.bitcast_convert_type(jnp.asarray(probe, jnp.float32), jnp.int32)
  return lax.cond((bits | 1) != 0, lambda t: t, lambda t: jax.tree.map(jnp.zeros_like, t), tree)


def _unpad_window(g_spread, padding, hw):
  """The window of a spread cotangent that maps onto the unpadded input: the adjoint of the padding."""
  b, c = g_spread.shape[0], g_spread.shape[3]
  return lax.slice(g_spread, (0, padding, padding, 0), (b, g_spread.shape[1] - padding,
                                                        g_spread.shape[2] - padding, c))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _shift_conv(x, w, stride, dilation, padding, out_hw):
  return _window_sum(_pad(x, padding), w, stride, dilation, out_hw)


def _shift_conv_fwd(x, w, stride, dilation, padding, out_hw):
  return _shift_conv(x, w, stride, dilation, padding, out_hw), (x, w)


def _shift_conv_bwd(stride, dilation, padding, out_hw, res, g):
  """dx: a stride-1 window sum of the spread cotangent with the flipped kernel, over the unpadded input's
  positions only (no work for the padding); dw: ``_tap_weight_grad``."""
  del out_hw
  x, w = res
  k = w.shape[0]
  g = fusion_barrier(g, w[0, 0, 0])
  hw = x.shape[1:3]
  padded_hw = tuple(n + 2 * padding for n in hw)
  g_spread = _unpad_window(_spread(g, k, stride, dilation, padded_hw), padding, hw)
  dx = fusion_barrier(_window_sum(g_spread, w[::-1, ::-1], 1, dilation, hw), w[0, 0, 0])
  xp = fusion_barrier(_pad(x, padding), w[0, 0, 0])
  return dx, _tap_weight_grad(xp, g, k, stride, dilation)


_shift_conv.defvjp(_shift_conv_fwd, _shift_conv_bwd)


def _window_max(xp, k, stride, out_hw):
  return functools.reduce(jnp.maximum, [_window(xp, t, stride, out_hw) for t in _taps(k, 1)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _shift_max(x, k, stride, padding, out_hw):
  return _window_max(_pad(x, padding, -jnp.inf), k, stride, out_hw)


def _shift_max_fwd(x, k, stride, padding, out_hw):
  """Max and the index of the first maximal tap of each window (PyTorch's tie-breaking)."""
  xp = _pad(x, padding, -jnp.inf)
  best, arg = None, None
  for t, offset in enumerate(_taps(k, 1)):
    window = _window(xp, offset, stride, out_hw)
    if best is None:
      best, arg = window, jnp.zeros(window.shape, jnp.int8)
    else:
      better = window > best
      best, arg = jnp.where(better, window, best), jnp.where(better, jnp.int8(t), arg)
  best, arg = fusion_barrier((best, arg), x[0, 0, 0, 0])
  return best, (jnp.zeros(x.shape[1:3], jnp.int8), arg)


def _shift_max_bwd(k, stride, padding, out_hw, res, g):
  """Each window's gradient goes to its first maximal input, as in PyTorch's max_pool2d (ties are common in a
  supernet: max-pool plateaus feed later max-pools)."""
  del out_hw
  hw_marker, arg = res
  g = fusion_barrier(g, g[0, 0, 0, 0])
  hw = hw_marker.shape
  padded_hw = tuple(n + 2 * padding for n in hw)
  e = k - 1
  terms = [_window(_unpad_window(_spread(jnp.where(arg == t, g, jnp.zeros_like(g)), k, stride, 1, padded_hw),
                                 padding, hw), (e - i, e - j), 1, hw)
           for t, (i, j) in enumerate(_taps(k, 1))]
  return (fusion_barrier(functools.reduce(operator.add, terms), g[0, 0, 0, 0]),)


_shift_max.defvjp(_shift_max_fwd, _shift_max_bwd)


def _pad(x, padding, value=0.0):
  return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=value)


def _grouped_conv(x, kernel, stride, padding, dilation=1):
  return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                  rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=x.shape[-1])


def _grouped_dilated_conv(x, kernel, stride, padding, dilation):
  """A 'same'-padded (``padding = dilation * (k - 1) / 2``) dilated depthwise conv as an undilated one.

  Stride ``dilation``: the output only reads the input's positions that are multiples of ``dilation``, so it is
  the undilated conv of ``x[:, ::d, ::d]`` with padding ``(k - 1) / 2``. Stride 1 (when ``d`` divides H and
  W): each of the ``d * d`` position phases ``x[:, r::d, q::d]`` only meets its own phase, so the phases run
  as one undilated conv over a ``d * d`` times larger batch. Same sums, every AD mode; on GPU the weight
  gradient is then cuDNN's depthwise backward-filter kernel, where XLA runs the dilated one's as a forward
  conv that cuDNN splits per channel (0.3-0.4 s of kernel time per PGD-7 training step of DARTS_V2 C=36 on
  an H100: benchmarks/RESULTS.md). Other shapes: the dilated conv as it is.
  """
  k, d = kernel.shape[0], dilation
  b, h, w, c = x.shape
  same = k % 2 == 1 and padding == d * (k - 1) // 2
  if same and stride == d:
    return _grouped_conv(x[:, ::d, ::d], kernel, 1, (k - 1) // 2)
  if same and stride == 1 and h % d == 0 and w % d == 0:
    phases = x.reshape(b, h // d, d, w // d, d, c).transpose(2, 4, 0, 1, 3, 5).reshape(d * d * b, h // d, w // d, c)
    y = _grouped_conv(phases, kernel, 1, (k - 1) // 2)
    return y.reshape(d, d, b, h // d, w // d, c).transpose(2, 3, 0, 4, 1, 5).reshape(b, h, w, c)
  return _grouped_conv(x, kernel, stride, padding, dilation)


def depthwise_conv2d(x, kernel, stride, padding, dilation, depthwise):
  """Depthwise conv (PyTorch ``groups=C``), kernel ``(k, k, 1, C)``."""
  k = kernel.shape[0]
  impl = resolve_depthwise(depthwise)
  if impl == 'grouped':
    if dilation > 1:
      return _grouped_dilated_conv(x, kernel, stride, padding, dilation)
    return _grouped_conv(x, kernel, stride, padding)
  out_hw = tuple(_out_size(s, k, stride, padding, dilation) for s in x.shape[1:3])
  if impl == 'shift':
    return _shift_conv(x, kernel[:, :, 0, :], stride, dilation, padding, out_hw)
  return _window_sum(_pad(x, padding), kernel[:, :, 0, :], stride, dilation, out_hw)


def max_pool(x, k, stride, padding, depthwise='autodiff'):
  """MaxPool2d with -inf padding, as a max over k*k shifted slices."""
  out_hw = tuple(_out_size(s, k, stride, padding) for s in x.shape[1:3])
  if resolve_depthwise(depthwise) == 'shift':
    return _shift_max(x, k, stride, padding, out_hw)
  return _window_max(_pad(x, padding, -jnp.inf), k, stride, out_hw)


@functools.lru_cache(maxsize=None)
def _valid_counts(h, w, k, stride, padding):
  ones = np.pad(np.ones((h, w)), padding)
  out_h, out_w = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
  counts = sum(ones[i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
               for i in range(k) for j in range(k))
  return counts[None, :, :, None]


def avg_pool(x, k, stride, padding, depthwise='autodiff'):
  """AvgPool2d with ``count_include_pad=False``."""
  out_hw = tuple(_out_size(s, k, stride, padding) for s in x.shape[1:3])
  ones = jnp.ones((k, k, x.shape[-1]), x.dtype)
  if resolve_depthwise(depthwise) == 'shift':
    total = _shift_conv(x, ones, stride, 1, padding, out_hw)
  else:
    total = _window_sum(_pad(x, padding), ones, stride, 1, out_hw)
  counts = _valid_counts(x.shape[1], x.shape[2], k, stride, padding)
  return total / jnp.asarray(counts, x.dtype)


# ------------------------------------------------------------------------------------------------
# Composite operations (init / apply pairs).
# ------------------------------------------------------------------------------------------------
def relu_conv_bn_init(rng, c_in, c_out, affine, k=1):
  bn_p, bn_s = bn_init(c_out, affine)
  return {'conv': conv_init(rng, k, c_in, c_out), 'bn': bn_p}, {'bn': bn_s}


def relu_conv_bn(params, stats, x, train, stride=1, padding=0):
  y = conv2d(jax.nn.relu(x), params['conv']['kernel'], stride, padding)
  y, bn_s = batch_norm(params['bn'], stats['bn'], y, train)
  return y, {'bn': bn_s}


def factorized_reduce_init(rng, c_in, c_out, affine):
  if c_out % 2:
    raise ValueError(f'FactorizedReduce needs an even number of output channels, got {c_out}')
  bn_p, bn_s = bn_init(c_out, affine)
  return ({'conv_1': conv_init(rng, 1, c_in, c_out // 2), 'conv_2': conv_init(rng, 1, c_in, c_out // 2),
           'bn': bn_p}, {'bn': bn_s})


def factorized_reduce(params, stats, x, train):
  """ReLU, two 1x1 stride-2 convs on x and on x shifted by one pixel, concat, BN."""
  x = jax.nn.relu(x)
  a = conv2d(x, params['conv_1']['kernel'], 2)
  b = conv2d(x[:, 1:, 1:, :], params['conv_2']['kernel'], 2)
  if a.shape != b.shape:
    raise ValueError(f'FactorizedReduce needs even spatial sizes, got {x.shape[1:3]}: '
                     'use an input size divisible by 4')
  y, bn_s = batch_norm(params['bn'], stats['bn'], jnp.concatenate([a, b], axis=-1), train)
  return y, {'bn': bn_s}


def _sep_init(rng, C, k, affine):
  (b1, s1), (b2, s2) = bn_init(C, affine), bn_init(C, affine)
  return ({'dw1': conv_init(rng, k, C, C, groups=C), 'pw1': conv_init(rng, 1, C, C), 'bn1': b1,
           'dw2': conv_init(rng, k, C, C, groups=C), 'pw2': conv_init(rng, 1, C, C), 'bn2': b2},
          {'bn1': s1, 'bn2': s2})


def _sep_apply(k, params, stats, x, stride, train, depthwise):
  y = depthwise_conv2d(jax.nn.relu(x), params['dw1']['kernel'], stride, k // 2, 1, depthwise)
  y = pointwise_conv2d(y, params['pw1']['kernel'], depthwise)
  y, s1 = batch_norm(params['bn1'], stats['bn1'], y, train, depthwise)
  y = depthwise_conv2d(jax.nn.relu(y), params['dw2']['kernel'], 1, k // 2, 1, depthwise)
  y = pointwise_conv2d(y, params['pw2']['kernel'], depthwise)
  y, s2 = batch_norm(params['bn2'], stats['bn2'], y, train, depthwise)
  return y, {'bn1': s1, 'bn2': s2}


def _dil_init(rng, C, k, affine):
  bn_p, bn_s = bn_init(C, affine)
  return ({'dw': conv_init(rng, k, C, C, groups=C), 'pw': conv_init(rng, 1, C, C), 'bn': bn_p},
          {'bn': bn_s})


def _dil_apply(k, params, stats, x, stride, train, depthwise):
  y = depthwise_conv2d(jax.nn.relu(x), params['dw']['kernel'], stride, k - 1, 2, depthwise)
  y = pointwise_conv2d(y, params['pw']['kernel'], depthwise)
  y, s = batch_norm(params['bn'], stats['bn'], y, train, depthwise)
  return y, {'bn': s}


def _pool_init(C, pool_bn):
  if not pool_bn:
    return {}, {}
  _, s = bn_init(C, affine=False)
  return {}, {'bn': s}


def _pool_apply(pool, params, stats, x, stride, train, depthwise):
  del params
  y = pool(x, 3, stride, 1, depthwise)
  if not stats:
    return y, stats
  y, s = batch_norm({}, stats['bn'], y, train, depthwise)
  return y, {'bn': s}


def _skip_init(rng, C, stride, affine):
  return factorized_reduce_init(rng, C, C, affine) if stride == 2 else ({}, {})


def _skip_apply(params, stats, x, stride, train, depthwise):
  del depthwise
  return factorized_reduce(params, stats, x, train) if stride == 2 else (x, stats)


def _none_apply(params, stats, x, stride, train, depthwise):
  del params, train, depthwise
  return jnp.zeros_like(x[:, ::stride, ::stride, :]), stats


class Op(NamedTuple):
  """A primitive: ``init(rng, C, stride, affine, pool_bn)`` and ``apply(params, stats, x, stride, train,
  depthwise)``."""
  init: Callable
  apply: Callable


OPS = {
    'none': Op(lambda rng, C, stride, affine, pool_bn: ({}, {}), _none_apply),
    'max_pool_3x3': Op(lambda rng, C, stride, affine, pool_bn: _pool_init(C, pool_bn),
                        functools.partial(_pool_apply, max_pool)),
    'avg_pool_3x3': Op(lambda rng, C, stride, affine, pool_bn: _pool_init(C, pool_bn),
                        functools.partial(_pool_apply, avg_pool)),
    'skip_connect': Op(lambda rng, C, stride, affine, pool_bn: _skip_init(rng, C, stride, affine),
                        _skip_apply),
    'sep_conv_3x3': Op(lambda rng, C, stride, affine, pool_bn: _sep_init(rng, C, 3, affine),
                        functools.partial(_sep_apply, 3)),
    'sep_conv_5x5': Op(lambda rng, C, stride, affine, pool_bn: _sep_init(rng, C, 5, affine),
                        functools.partial(_sep_apply, 5)),
    'dil_conv_3x3': Op(lambda rng, C, stride, affine, pool_bn: _dil_init(rng, C, 3, affine),
                        functools.partial(_dil_apply, 3)),
    'dil_conv_5x5': Op(lambda rng, C, stride, affine, pool_bn: _dil_init(rng, C, 5, affine),
                        functools.partial(_dil_apply, 5)),
}


def check_primitive(name: str) -> None:
  if name not in OPS:
    raise ValueError(f'unknown operation {name!r}: choose one of {sorted(OPS)}')


def is_identity(name: str, stride: int) -> bool:
  """True for ops that leave their input untouched (drop-path skips them, as in NetworkCIFAR)."""
  return name == 'skip_connect' and stride == 1
