"""Test-session setup: 8 fake CPU devices, strict shapes, warnings as errors.

The device count must be set before the JAX backend starts, so it is set here,
at import time, before any test module touches a device.
"""

import jax

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')
