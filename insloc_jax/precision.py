"""The working precision of parameters, statistics, embeddings and logits.

float32 for float32 and bfloat16 runs (bfloat16 only computes; what is kept stays float32); float64 for a
run that computes in float64, a verification mode (under `jax_enable_x64`) in which the differential tests
compare the whole step with the PyTorch reference to float64 rounding.
"""
import jax.numpy as jnp


def wide(dtype) -> jnp.dtype:
    """float32, or float64 when `dtype` is float64: the type precision-sensitive values are kept in."""
    return jnp.promote_types(jnp.float32, dtype)
