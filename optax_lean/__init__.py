"""optax_lean: memory-lean optimizers as composable optax transformations."""

from optax_lean._src.apollo import apollo, apollo_mini, scale_by_apollo
from optax_lean._src.axis_names import AXIS_ROLES, axis_names_dimension_numbers
from optax_lean._src.combine import (
  AddDecayedWeightsAfterUpdateState,
  ScaleByRatioState,
  add_decayed_weights_after_update,
  scale_by_ratio,
)
from optax_lean._src.dimension_numbers import DimensionNumbers
from optax_lean._src.galore import ScaleByGaLoreState, galore, scale_by_galore
from optax_lean._src.layers import layer_axes, merge_layers, split_layers, update_layer
from optax_lean._src.ldadam import ScaleByLDAdamState, ldadam, scale_by_ldadam
from optax_lean._src.low_precision import (
  KahanSummationState,
  MasterWeightsState,
  StochasticRoundingState,
  kahan_summation,
  master_weights,
  stochastic_rounding,
)
from optax_lean._src.memory import state_bytes, state_bytes_by_kind, state_bytes_by_leaf
from optax_lean._src.nnx_layouts import nnx_dimension_numbers
from optax_lean._src.norm_growth import ScaleByNormGrowthLimitState, scale_by_norm_growth_limit
from optax_lean._src.online_subspace import (
  ScaleByOnlineSubspaceDescentState,
  online_subspace_descent,
  scale_by_online_subspace_descent,
)
from optax_lean._src.projectors import (
  PROJECTORS,
  GaussianProjector,
  PowerIterationProjector,
  Projector,
  RandomizedSVDProjector,
  RandomProjector,
  SVDProjector,
  TopKProjector,
  UniformProjector,
  get_projector,
)
from optax_lean._src.quantization import QuantizedArray, QuantizedState, quantize_state
from optax_lean._src.rso import ScaleByRandomSubspaceState, rso, scale_by_random_subspace
from optax_lean._src.scale import ScaleByColumnNormState, scale, scale_by_column_norm
from optax_lean._src.selection import default_mask, stacked_dimension_numbers
from optax_lean._src.sharding import state_sharding
from optax_lean._src.snsm import adagrad_sn, adagrad_snsm, adamsn, adamsnsm, rmsprop_sn, sgd_sm
from optax_lean._src.subset_norm import ScaleBySubsetNormState, scale_by_subset_norm
from optax_lean._src.subspace_adam import ScaleBySubspaceAdamState
from optax_lean._src.subspace_momentum import (
  ScaleBySubspaceMomentumState,
  scale_by_subspace_momentum,
)
from optax_lean._src.sumo import sumo

__version__ = '0.1.0'

__all__ = (
  'AXIS_ROLES',
  'PROJECTORS',
  'AddDecayedWeightsAfterUpdateState',
  'DimensionNumbers',
  'GaussianProjector',
  'KahanSummationState',
  'MasterWeightsState',
  'PowerIterationProjector',
  'Projector',
  'QuantizedArray',
  'QuantizedState',
  'RandomProjector',
  'RandomizedSVDProjector',
  'SVDProjector',
  'ScaleByColumnNormState',
  'ScaleByGaLoreState',
  'ScaleByLDAdamState',
  'ScaleByNormGrowthLimitState',
  'ScaleByOnlineSubspaceDescentState',
  'ScaleByRandomSubspaceState',
  'ScaleByRatioState',
  'ScaleBySubsetNormState',
  'ScaleBySubspaceAdamState',
  'ScaleBySubspaceMomentumState',
  'StochasticRoundingState',
  'TopKProjector',
  'UniformProjector',
  'adagrad_sn',
  'adagrad_snsm',
  'adamsn',
  'adamsnsm',
  'add_decayed_weights_after_update',
  'apollo',
  'apollo_mini',
  'axis_names_dimension_numbers',
  'default_mask',
  'galore',
  'get_projector',
  'kahan_summation',
  'layer_axes',
  'ldadam',
  'master_weights',
  'merge_layers',
  'nnx_dimension_numbers',
  'online_subspace_descent',
  'quantize_state',
  'rmsprop_sn',
  'rso',
  'scale',
  'scale_by_apollo',
  'scale_by_column_norm',
  'scale_by_galore',
  'scale_by_ldadam',
  'scale_by_norm_growth_limit',
  'scale_by_online_subspace_descent',
  'scale_by_random_subspace',
  'scale_by_ratio',
  'scale_by_subset_norm',
  'scale_by_subspace_momentum',
  'sgd_sm',
  'split_layers',
  'stacked_dimension_numbers',
  'state_bytes',
  'state_bytes_by_kind',
  'state_bytes_by_leaf',
  'state_sharding',
  'stochastic_rounding',
  'sumo',
  'update_layer',
)
