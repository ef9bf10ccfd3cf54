"""An independent NumPy reference of the official SN-SM ``GenericOptim``.

Written from the paper (Nguyen & Nguyen, arXiv 2411.07120)
and the official code (https://github.com/timmytonga/sn-sm) in that code's own
orientation: a PyTorch weight ``W`` of shape ``(m, n) = (out, in)``.
Everything runs in float64. It shares no code with ``optax_lean``; the tests
feed it ``K.T`` for a Flax kernel ``K``.
"""

from __future__ import annotations

import math

import numpy as np


def closest_smaller_divisor(n: int, k: int) -> int:
  if n % k == 0:
    return k
  for i in range(k, 0, -1):
    if n % i == 0:
      return i
  raise ValueError


def canonical_signs(vectors: np.ndarray, axis: int) -> np.ndarray:
  """Flips vectors (laid along ``axis``) so their largest-|.| entry is > 0."""
  idx = np.argmax(np.abs(vectors), axis=axis)
  if axis == 0:
    pivot = vectors[idx, np.arange(vectors.shape[1])]
    return vectors * np.where(pivot < 0, -1.0, 1.0)[None, :]
  pivot = vectors[np.arange(vectors.shape[0]), idx]
  return vectors * np.where(pivot < 0, -1.0, 1.0)[:, None]


def svd_projector(g, rank):
  """The official ``svd``/``std`` projector: ``B (r, n)`` (rows) if m >= n, else ``A (m, r)``."""
  u, _, vt = np.linalg.svd(g, full_matrices=False)
  if g.shape[0] >= g.shape[1]:
    return canonical_signs(vt[:rank, :], axis=1)
  return canonical_signs(u[:, :rank], axis=0)


class GenericOptimReference:
  """One parameter of the official optimizer.

  Args:
    momentum: 'sm' (subspace momentum), 'ema' (Adam momentum) or 'none'.
    second_moment: 'sn' (subset norm), 'ema' (Adam) or 'none'.
    subset_size: 'heuristics' or an int, for 'sn'.
    proj_type: 'svd', 'topk', 'uniform' or 'given' (the test supplies the
      projector at each refresh through ``given``).
    policy: what the momentum does at a refresh: 'official' (reset quirk),
      'keep' (overlap_state), 'reset' or 'rotate'.
  """

  def __init__(
    self,
    shape,
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    correct_bias=True,
    momentum='sm',
    second_moment='sn',
    subset_size='heuristics',
    rank=4,
    gap=10,
    proj_type='svd',
    policy='official',
  ):
    self.shape = shape
    self.b1, self.b2, self.eps = b1, b2, eps
    self.correct_bias = correct_bias
    self.momentum, self.second_moment = momentum, second_moment
    self.subset_size = subset_size
    self.rank, self.gap = rank, gap
    self.proj_type, self.policy = proj_type, policy
    self.t = 0
    self.m = None
    self.v = None
    self.proj = None  # svd: basis; topk/uniform: indices

  # ---- projector (official projectors/*) -------------------------------
  def _tall(self):
    m, n = self.shape
    return m >= n

  def _new_projector(self, g, given):
    m, n = g.shape
    if self.proj_type in ('svd', 'given'):
      return given if self.proj_type == 'given' else svd_projector(g, min(self.rank, m, n))
    if self.proj_type == 'topk':
      norms = np.linalg.norm(g, axis=1) if self._tall() else np.linalg.norm(g, axis=0)
      return np.argsort(-norms, kind='stable')[: self.rank]
    if self.proj_type == 'uniform':
      return given
    raise ValueError(self.proj_type)

  def _project(self, g):
    if self.proj_type in ('topk', 'uniform'):
      return g[self.proj, :] if self._tall() else g[:, self.proj]
    return g @ self.proj.T if self._tall() else self.proj.T @ g

  def _back(self, x):
    if self.proj_type in ('topk', 'uniform'):
      out = np.zeros(self.shape)
      if self._tall():
        out[self.proj, :] = x
      else:
        out[:, self.proj] = x
      return out
    return x @ self.proj if self._tall() else self.proj @ x

  def _rotate(self, m_state, old, new):
    if self.proj_type in ('topk', 'uniform'):
      size = self.shape[0] if self._tall() else self.shape[1]
      sel_old = np.eye(size)[old]  # (r, size): rows pick coordinates
      sel_new = np.eye(size)[new]
      c = sel_new @ sel_old.T  # (r, r)
      return c @ m_state if self._tall() else m_state @ c.T
    if self._tall():  # B rows: R = g B^T, m (m, r); new coords = m B_old B_new^T
      return m_state @ (old @ new.T)
    return (new.T @ old) @ m_state  # A cols: m (r, n)

  # ---- subset norm (official subset_norm.py) ---------------------------
  def _subset_view(self, x):
    """Shapes x for the subset reduction, and the inverse."""
    m, n = self.shape
    if self.subset_size == 'heuristics':
      return x, lambda y: y
    numel = m * n
    if self.subset_size > 0:
      size = closest_smaller_divisor(numel, self.subset_size)
    else:
      size = closest_smaller_divisor(numel, max(1, int(math.sqrt(numel) / -self.subset_size)))
    return x.reshape(numel // size, size), lambda y: y.reshape(m, n)

  def _sn_statistic(self, g):
    if self.subset_size == 'heuristics':
      m, n = g.shape
      keep = 0 if m >= n else 1
      return np.sum(g**2, axis=1 - keep, keepdims=True)
    view, _ = self._subset_view(g)
    return np.sum(view**2, axis=1, keepdims=True)

  # ---- one step ----------------------------------------------------------
  def step(self, g, given=None):
    """Returns ``u`` such that the official update is ``p -= lr * u``."""
    g = np.asarray(g, np.float64)
    self.t += 1
    t = self.t
    b1, b2 = self.b1, self.b2

    if self.momentum == 'sm':
      refresh = self.proj is None or t % self.gap == 0
      if refresh:
        old = self.proj
        self.proj = self._new_projector(g, given)
        if self.m is not None and t > 1:
          if self.policy == 'reset':
            self.m = np.zeros_like(self.m)
          elif self.policy == 'rotate':
            self.m = self._rotate(self.m, old, self.proj)
      r = self._project(g)
      if self.m is None:
        self.m = np.zeros_like(r)
      m_new = b1 * self.m + (1 - b1) * r
      numerator = self._back(m_new) + (g - self._back(r))
      if self.policy == 'official' and t > 1 and t % self.gap == 0:
        self.m = np.zeros_like(r)
      else:
        self.m = m_new
    elif self.momentum == 'ema':
      if self.m is None:
        self.m = np.zeros_like(g)
      self.m = b1 * self.m + (1 - b1) * g
      numerator = self.m
    else:
      numerator = g

    step = 1.0
    if self.correct_bias:
      step = math.sqrt(1 - b2**t) / (1 - b1**t)

    if self.second_moment == 'none':
      return step * numerator
    s = self._sn_statistic(g) if self.second_moment == 'sn' else g**2
    if self.v is None:
      self.v = np.zeros_like(s)
    self.v = self.v + s if b2 == 1 else b2 * self.v + (1 - b2) * s
    denom = np.sqrt(self.v) + self.eps
    if self.second_moment == 'sn' and self.subset_size != 'heuristics':
      view, unview = self._subset_view(numerator)
      return step * unview(view / denom)
    return step * numerator / denom
