"""train.py's parameter sharding rule on an 8-device mesh. (That a ``--mesh`` run trains like
one device is checked by tests/test_multihost.py, whose two processes span the same mesh.)"""

import jax
import numpy as np

from experiments import train


def test_param_sharding_rule():
    mesh = train.parse_mesh("data=4,model=2")
    w = jax.ShapeDtypeStruct((128, 384), np.float32)
    assert train.param_sharding(mesh, w).spec == jax.sharding.PartitionSpec("data", "model")
    odd = jax.ShapeDtypeStruct((6, 7), np.float32)  # neither axis divides: replicated
    assert train.param_sharding(mesh, odd).spec == jax.sharding.PartitionSpec(None, None)
    vec = jax.ShapeDtypeStruct((128,), np.float32)
    assert train.param_sharding(mesh, vec).spec == jax.sharding.PartitionSpec(None)
