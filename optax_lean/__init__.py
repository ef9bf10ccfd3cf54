"""optax_lean: memory-lean optimizers as composable optax transformations."""

from optax_lean._src.alias import adagrad_sn
from optax_lean._src.alias import adagrad_snsm
from optax_lean._src.alias import adamsn
from optax_lean._src.alias import adamsnsm
from optax_lean._src.alias import rmsprop_sn
from optax_lean._src.alias import sgd_sm
from optax_lean._src.combine import AddDecayedWeightsAfterUpdateState
from optax_lean._src.combine import ScaleByRatioState
from optax_lean._src.combine import add_decayed_weights_after_update
from optax_lean._src.combine import scale_by_ratio
from optax_lean._src.dimension_numbers import DimensionNumbers
from optax_lean._src.dimension_numbers import default_mask
from optax_lean._src.memory import state_bytes
from optax_lean._src.memory import state_bytes_by_kind
from optax_lean._src.memory import state_bytes_by_leaf
from optax_lean._src.projectors import Projector
from optax_lean._src.projectors import RandomizedSVDProjector
from optax_lean._src.projectors import RandomProjector
from optax_lean._src.projectors import SVDProjector
from optax_lean._src.projectors import TopKProjector
from optax_lean._src.projectors import UniformProjector
from optax_lean._src.sharding import state_sharding
from optax_lean._src.subset_norm import ScaleBySubsetNormState
from optax_lean._src.subset_norm import scale_by_subset_norm
from optax_lean._src.subspace_momentum import ScaleBySubspaceMomentumState
from optax_lean._src.subspace_momentum import scale_by_subspace_momentum

__version__ = '0.1.0'

__all__ = (
    'AddDecayedWeightsAfterUpdateState',
    'DimensionNumbers',
    'Projector',
    'RandomProjector',
    'RandomizedSVDProjector',
    'SVDProjector',
    'ScaleByRatioState',
    'ScaleBySubsetNormState',
    'ScaleBySubspaceMomentumState',
    'TopKProjector',
    'UniformProjector',
    'adagrad_sn',
    'adagrad_snsm',
    'adamsn',
    'adamsnsm',
    'add_decayed_weights_after_update',
    'default_mask',
    'rmsprop_sn',
    'scale_by_ratio',
    'scale_by_subset_norm',
    'scale_by_subspace_momentum',
    'sgd_sm',
    'state_bytes',
    'state_bytes_by_kind',
    'state_bytes_by_leaf',
    'state_sharding',
)
