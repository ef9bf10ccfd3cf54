"""Independent NumPy references of GaLore, LDAdam, Online Subspace Descent and RSO.

Written from the papers (GaLore, arXiv 2403.03507; LDAdam, arXiv 2410.16103;
Online Subspace Descent, arXiv 2408.12857; RSO, arXiv 2502.07222) and the
released code of the first three, in the official code's own orientation: a
PyTorch weight ``W`` of shape ``(m, n) = (out, in)``.
Everything runs in float64 and shares no code with ``optax_lean``; the tests
feed it ``K.T`` for a Flax kernel ``K``. Each ``step(g)`` returns ``u`` such
that the official update is ``p -= lr * u``; weight decay, whose order differs
between the optimizers, is left to the test.
"""

from __future__ import annotations

import math

import numpy as np

from tests.reference import svd_projector


def torch_adam(m, v, g, t, b1, b2, eps):
  """``torch.optim.Adam``'s moments and direction at 1-based step ``t``."""
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g**2
  return m, v, (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)


class GaLoreAdamWReference:
  """One parameter of the official ``GaLoreAdamW`` (``proj_type='std'``).

  Args:
    projected: Whether the parameter is in the GaLore group.
    proj_type: 'svd', or 'given' (the test supplies the projector at each
      refresh, in this orientation: ``Q (r, n)`` if m >= n else ``P (m, r)``).
  """

  def __init__(
    self,
    shape,
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    rank=4,
    gap=10,
    scale=0.25,
    projected=True,
    proj_type='svd',
  ):
    self.shape, self.b1, self.b2, self.eps = shape, b1, b2, eps
    self.rank, self.gap, self.scale = rank, gap, scale
    self.projected, self.proj_type = projected, proj_type
    self.k = 0
    self.proj = self.m = self.v = None

  def new_projector(self, g, given):
    return given if self.proj_type == 'given' else svd_projector(g, self.rank)

  def project(self, g):
    return g @ self.proj.T if g.shape[0] >= g.shape[1] else self.proj.T @ g

  def back(self, x):
    # The official project_back decides the side from the low-rank shape.
    return x @ self.proj if x.shape[0] >= x.shape[1] else self.proj @ x

  def step(self, g, given=None):
    g = np.asarray(g, np.float64)
    if self.projected:
      if self.proj is None or self.k % self.gap == 0:
        self.proj = self.new_projector(g, given)
      r = self.project(g)
    else:
      r = g
    if self.m is None:
      self.m, self.v = np.zeros_like(r), np.zeros_like(r)
    self.k += 1
    b1, b2, k = self.b1, self.b2, self.k
    self.m = b1 * self.m + (1 - b1) * r
    self.v = b2 * self.v + (1 - b2) * r**2
    n = self.m / (np.sqrt(self.v) + self.eps)
    step = math.sqrt(1 - b2**k) / (1 - b1**k)
    if self.projected:
      n = self.scale * self.back(n)
    return step * n


class OnlineSubspaceDescentReference(GaLoreAdamWReference):
  """The released OSD code (``proj_type='continuous'``) for one parameter.

  GaLore's AdamW; the projector is the SVD one at the first step, then after
  every step takes one ``torch.optim.AdamW`` step on the online-PCA loss of
  that step's gradient. ``lr_ratio(k)`` is ``lr_k / lr_0`` at 0-based step k.
  """

  def __init__(
    self,
    shape,
    *,
    lr_ratio=lambda k: 1.0,
    proj_b1=0.9,
    proj_b2=0.999,
    proj_eps=1e-8,
    proj_wd=0.01,
    penalty=0.0,
    **kwargs,
  ):
    super().__init__(shape, **kwargs)
    self.step_gap, self.gap = self.gap, math.inf  # no SVD after the first step
    self.lr_ratio = lr_ratio
    self.proj_b1, self.proj_b2, self.proj_eps, self.proj_wd = proj_b1, proj_b2, proj_eps, proj_wd
    self.penalty = penalty
    self.proj_steps = 0

  def pca_loss(self, proj, g):
    gh = g / np.linalg.norm(g)
    if g.shape[0] >= g.shape[1]:  # right: B (r, n)
      loss = np.linalg.norm(gh @ proj.T @ proj - gh) ** 2
      gram = proj @ proj.T
    else:  # left: A (m, r)
      loss = np.linalg.norm(proj @ proj.T @ gh - gh) ** 2
      gram = proj.T @ proj
    return loss + self.penalty * np.linalg.norm(gram - np.eye(len(gram))) ** 2

  def pca_gradient(self, proj, g):
    """The closed-form gradient of ``pca_loss`` (checked by finite differences)."""
    gh = g / np.linalg.norm(g)
    r = min(proj.shape)
    if g.shape[0] >= g.shape[1]:
      e = gh @ proj.T @ proj - gh
      grad = 2 * (proj @ e.T @ gh + proj @ gh.T @ e)
      return grad + 4 * self.penalty * (proj @ proj.T - np.eye(r)) @ proj
    e = proj @ proj.T @ gh - gh
    grad = 2 * (e @ gh.T @ proj + gh @ e.T @ proj)
    return grad + 4 * self.penalty * proj @ (proj.T @ proj - np.eye(r))

  def step(self, g, given=None):
    g = np.asarray(g, np.float64)
    k = self.k
    learn = self.projected and self.proj is not None
    if learn:
      grad = self.pca_gradient(self.proj, g)
    u = super().step(g, given)
    if learn:
      self.proj_steps += 1
      t = self.proj_steps
      if t == 1:
        self.pm, self.pv = np.zeros_like(grad), np.zeros_like(grad)
      lr = self.lr_ratio(k) / self.step_gap
      self.proj = self.proj * (1 - lr * self.proj_wd)
      self.pm = self.proj_b1 * self.pm + (1 - self.proj_b1) * grad
      self.pv = self.proj_b2 * self.pv + (1 - self.proj_b2) * grad**2
      denom = np.sqrt(self.pv) / math.sqrt(1 - self.proj_b2**t) + self.proj_eps
      self.proj = self.proj - lr / (1 - self.proj_b1**t) * self.pm / denom
    return u


class LDAdamWReference:
  """One parameter of the official ``LDAdamW`` (``proj_type='std'``)."""

  def __init__(
    self,
    shape,
    *,
    b1=0.908,
    b2=0.99,
    eps=1e-8,
    rank=4,
    rho=0.908,
    error_feedback=True,
    lowrank=True,
    proj_method='power_iteration',
  ):
    self.b1, self.b2, self.eps, self.rank, self.rho = b1, b2, eps, rank, rho
    self.error_feedback, self.lowrank, self.proj_method = error_feedback, lowrank, proj_method
    self.right = len(shape) == 2 and shape[0] > shape[1]  # square -> left
    self.k = 0
    self.m = self.v = self.proj = None
    self.err = np.zeros(shape)

  def project(self, x, proj):
    return x @ proj.T if self.right else proj.T @ x

  def back(self, x, proj):
    return x @ proj if self.right else proj @ x

  def svd(self, b):
    u, _, vt = np.linalg.svd(b, full_matrices=False)
    return vt[: self.rank, :] if self.right else u[:, : self.rank]

  def power_iteration(self, b, old):
    if self.right:  # Q (r, n): QR(b^T b Q_old^T)^T
      q, _ = np.linalg.qr(b.T @ (b @ old.T))
      return q.T
    q, _ = np.linalg.qr(b @ (b.T @ old))  # P (m, r)
    return q

  def step(self, g):
    g = np.asarray(g, np.float64)
    b1, b2, k = self.b1, self.b2, self.k
    self.k += 1
    if not self.lowrank:
      if self.m is None:
        self.m, self.v = np.zeros_like(g), np.zeros_like(g)
      self.m, self.v, d = torch_adam(self.m, self.v, g, k + 1, b1, b2, self.eps)
      return d
    a = g + self.err if self.error_feedback else g
    if k == 0:
      new = self.svd(a)
      old = np.zeros_like(new)
      self.m = np.zeros_like(self.project(a, new))
      self.v = np.zeros_like(self.m)
    else:
      old = self.proj
      b = self.rho * self.back(self.m, old) / (1 - b1**k) + (1 - self.rho) * a
      new = self.svd(b) if self.proj_method == 'svd' else self.power_iteration(b, old)
    low = self.project(a, new)
    if self.right:
      change = old @ new.T
      m_rot = self.m @ change
    else:
      change = new.T @ old
      m_rot = change @ self.m
    if self.error_feedback:
      e = a - self.back(low, new)
      self.err = e + b1 / (1 - b1) * (self.back(self.m, old) - self.back(m_rot, new))
    if k > 0:
      bc1, bc2 = 1 - b1**k, 1 - b2**k
      var = self.v / bc2 - self.m**2 / bc1**2
      var = var @ (change * change) if self.right else (change * change) @ var
      self.v = bc2 * np.abs(var + m_rot**2 / bc1**2)
      self.m = m_rot
    self.m, self.v, d = torch_adam(self.m, self.v, low, k + 1, b1, b2, self.eps)
    self.proj = new
    return self.back(d, new)


class RandomSubspaceReference:
  """RSO with an Adam inner solver, written in its own variables.

  For a PyTorch weight ``W (m, n)`` and an input-side basis ``P (n, r)``
  (given by the test at each resample) the layer is ``W + B P^T`` with
  ``B (m, r)`` starting at zero; Adam on ``B`` restarts with each new ``P``.
  The step on ``W`` is then ``dB P^T``. Unprojected parameters run Adam.
  """

  def __init__(self, shape, *, b1=0.9, b2=0.999, eps=1e-8, gap=10, projected=True):
    self.b1, self.b2, self.eps, self.gap, self.projected = b1, b2, eps, gap, projected
    self.k = 0
    self.m = self.v = None

  def step(self, g, given=None):
    g = np.asarray(g, np.float64)
    if self.projected:
      if self.k % self.gap == 0:
        self.basis = given
        self.m = self.v = np.zeros((g.shape[0], given.shape[1]))
        self.inner = 0
      grad_b = g @ self.basis  # d f(W + B P^T) / dB
    else:
      if self.m is None:
        self.m = self.v = np.zeros_like(g)
      grad_b = g
    self.k += 1
    t = self.k
    if self.projected:
      self.inner += 1
      t = self.inner
    self.m, self.v, d = torch_adam(self.m, self.v, grad_b, t, self.b1, self.b2, self.eps)
    return d @ self.basis.T if self.projected else d


class ApolloReference:
  """APOLLO's ``AdamW.step`` (official ``apollo_torch/apollo.py``) on one PyTorch weight.

  For ``W (m, n)`` the sketch ``P`` (given by the test at each refresh, the
  library's Gaussian draw) reduces the smaller axis: ``R = P^T G`` with ``P (m,
  r)`` when ``m < n``, else ``R = G P`` with ``P (n, r)``. Adam's moments of
  ``R`` are never reset; the gradient is scaled per channel (the larger axis)
  or as a whole by ``||M / (sqrt(V) + eps)|| / (||R|| + 1e-8)``, limited in
  norm growth (``gamma``, from the second step), multiplied by ``sqrt(scale)``
  and by the bias correction ``sqrt(1 - b2^t) / (1 - b1^t)``. Unprojected
  parameters get the same Adam on ``G`` itself, with no scaling rule. With
  ``rule='paper'`` (Algorithm 1), the ratios come from the bias-corrected
  moments and no correction multiplies the result.
  """

  def __init__(
    self,
    shape,
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    gap=10,
    scale=1.0,
    scale_type='channel',
    gamma=1.01,
    projected=True,
    rule='official',
  ):
    self.rule = rule
    self.b1, self.b2, self.eps, self.gap = b1, b2, eps, gap
    self.scale, self.scale_type, self.gamma, self.projected = scale, scale_type, gamma, projected
    self.k = 0
    self.m = self.v = self.previous_norm = None

  def step(self, g, given=None):
    g = np.asarray(g, np.float64)
    rows, cols = g.shape if self.projected else (None, None)
    if self.projected:
      if self.k % self.gap == 0:
        self.sketch = given
      r = self.sketch.T @ g if rows < cols else g @ self.sketch
    else:
      r = g
    if self.m is None:
      self.m, self.v = np.zeros_like(r), np.zeros_like(r)
    self.k += 1
    self.m = self.b1 * self.m + (1 - self.b1) * r
    self.v = self.b2 * self.v + (1 - self.b2) * r * r
    correction1, correction2 = 1 - self.b1**self.k, 1 - self.b2**self.k
    if self.rule == 'official':
      step_size = np.sqrt(correction2) / correction1
      normalised = self.m / (np.sqrt(self.v) + self.eps)
    else:  # Algorithm 1: AdamW's corrected moments, nothing folded in
      step_size = 1.0
      normalised = (self.m / correction1) / (np.sqrt(self.v / correction2) + self.eps)
    if not self.projected:
      return step_size * normalised
    if self.scale_type == 'channel':
      axis = 0 if rows < cols else 1  # the rank axis of r
      factor = np.linalg.norm(normalised, axis=axis) / (np.linalg.norm(r, axis=axis) + 1e-8)
      scaled = g * (factor[None, :] if rows < cols else factor[:, None])
    else:
      scaled = g * (np.linalg.norm(normalised) / (np.linalg.norm(r) + 1e-8))
    norm = np.linalg.norm(scaled)
    if self.previous_norm is None:
      self.previous_norm = norm
    else:
      limiter = max(norm / (self.previous_norm + 1e-8), self.gamma) / self.gamma
      scaled = scaled / limiter
      self.previous_norm = norm / limiter
    return step_size * np.sqrt(self.scale) * scaled


class ScaleReference:
  """One parameter of the official ``SCALE.step`` (``scale_optimizer.py``).

  ``role`` is ``'main'`` (a hidden linear weight ``(out, in)`` or, with
  ``col_dim=0``, the embedding ``(vocabulary, features)``): the gradient over
  its root mean square along ``col_dim``, floored at 1e-8; ``'secondary'``
  (the output layer): the same of the momentum ``m.lerp_(g, 1 - momentum)``;
  ``'oned'``: Hugging Face's Adam (``eps`` on the uncorrected root, the bias
  corrections folded into the step). Decay, before the update in SCALE, is left
  to the test.
  """

  def __init__(self, role, *, col_dim=1, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8):
    self.role, self.col_dim, self.momentum = role, col_dim, momentum
    self.b1, self.b2, self.eps = b1, b2, eps
    self.k = 0
    self.m = self.v = None

  def step(self, g):
    g = np.asarray(g, np.float64)
    if self.m is None:
      self.m, self.v = np.zeros_like(g), np.zeros_like(g)
    self.k += 1
    if self.role == 'oned':
      self.m = self.b1 * self.m + (1 - self.b1) * g
      self.v = self.b2 * self.v + (1 - self.b2) * g * g
      correction = (1 - self.b1**self.k) / np.sqrt(1 - self.b2**self.k)
      return self.m / (self.eps + np.sqrt(self.v)) / correction
    if self.role == 'secondary':
      self.m = self.m + (1 - self.momentum) * (g - self.m)
      g = self.m
    rms = np.sqrt(np.mean(g * g, axis=self.col_dim, keepdims=True))
    return g / np.maximum(rms, 1e-8)


class SumoReference:
  """One parameter of the official ``SUMO.step`` (``optimizers_torch/sumo_optimizer.py``).

  For ``W (m, n)`` with ``m >= n`` the basis is ``B = V^T[:r] (r, n)`` and
  ``R = G B^T``; otherwise ``A = U[:, :r] (m, r)`` and ``R = A^T G`` (the
  official ``proj_type='std'``), recomputed by an exact SVD at the first step
  and whenever the 1-based step is a multiple of ``gap``. The momentum is the
  code's sum ``m = mu m + R``; with ``nesterov`` the stored momentum becomes
  ``R + mu m``, as the code writes it. Its polar factor ``O = U V^T`` (an SVD
  of ``m``) gives ``u = G - back(R - ratio O)``, ``ratio = 0.2 sqrt(max(m,
  n))`` (or 1 with ``consistent_rms=None``). ``policy='rotate'`` carries the
  momentum into a new basis, Algorithm 1's ``m <- Q_new^T Q_old m``; the
  code keeps it (``'keep'``). The norm-growth limiter is the code's, on
  ``O``. Unprojected parameters get the code's AdamW backup (``eps`` on the
  uncorrected root, both corrections folded into the step). With
  ``residual='subset_norm'`` (optax_lean's variant), ``G - back(R)`` is
  AdamSNSM's: over ``1 - b1^t`` and the root of the official 'heuristics'
  subset norm (one subset per row if ``m >= n``, else per column), times
  ``sqrt(1 - b2^t)``, before the polar part is added. Decay is left to the
  test.
  """

  def __init__(
    self,
    shape,
    *,
    momentum=0.9,
    nesterov=False,
    rank=3,
    gap=10,
    consistent_rms=0.2,
    policy='keep',
    residual='gradient',
    gamma=1.1,
    projected=True,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
  ):
    self.shape, self.momentum, self.nesterov = shape, momentum, nesterov
    self.rank, self.gap, self.consistent_rms, self.policy = rank, gap, consistent_rms, policy
    self.gamma, self.projected, self.residual = gamma, projected, residual
    self.b1, self.b2, self.eps = b1, b2, eps
    self.k = 0
    self.basis = self.m = self.v = self.previous_norm = self.norms = None

  def project(self, g):
    return g @ self.basis.T if self.right else self.basis.T @ g

  def back(self, x):
    return x @ self.basis if self.right else self.basis @ x

  def step(self, g):
    g = np.asarray(g, np.float64)
    self.k += 1
    if not self.projected:
      return self.adamw(g)
    self.right = g.shape[0] >= g.shape[1]
    if self.basis is None or self.k % self.gap == 0:
      old, self.basis = self.basis, svd_projector(g, self.rank)
      if self.policy == 'rotate' and old is not None:
        self.m = self.m @ old @ self.basis.T if self.right else self.basis.T @ old @ self.m
    r = self.project(g)
    if self.m is None:
      self.m = np.zeros_like(r)
    self.m = self.momentum * self.m + r
    if self.nesterov:
      self.m = r + self.momentum * self.m
    u, _, vt = np.linalg.svd(self.m, full_matrices=False)
    o = u @ vt
    norm = np.linalg.norm(o)
    if self.previous_norm is not None and norm / (self.previous_norm + 1e-8) > self.gamma:
      o = o / (norm + 1e-8) * self.gamma * self.previous_norm
    self.previous_norm = np.linalg.norm(o)
    ratio = 1.0 if self.consistent_rms is None else self.consistent_rms * math.sqrt(max(g.shape))
    if self.residual == 'gradient':
      return g - self.back(r - ratio * o)
    squares = np.sum(g * g, axis=1 if self.right else 0, keepdims=True)
    self.norms = (1 - self.b2) * squares + (0 if self.norms is None else self.b2 * self.norms)
    step_size = math.sqrt(1 - self.b2**self.k) / (1 - self.momentum**self.k)
    residual = step_size * (g - self.back(r)) / (np.sqrt(self.norms) + self.eps)
    return residual + ratio * self.back(o)

  def adamw(self, g):
    if self.m is None:
      self.m, self.v = np.zeros_like(g), np.zeros_like(g)
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    step_size = math.sqrt(1 - self.b2**self.k) / (1 - self.b1**self.k)
    return step_size * self.m / (np.sqrt(self.v) + self.eps)
