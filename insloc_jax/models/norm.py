"""BatchNorm with PyTorch semantics, cross-device statistics and ghost groups.

flax's `nn.BatchNorm` can reduce statistics over a device axis but cannot split one device's batch into
independently normalised groups, which is what lets a single device reproduce the per-device BatchNorm of an
N-device run (and what shuffle BN needs when the key batch is processed in one piece).

Conventions, chosen so that export to PyTorch is a pure rename:
  * `batch_stats/var` holds what `torch.nn.BatchNorm2d.running_var` holds: a running average of the
    *unbiased* batch variance (sum of squares / (n - 1)). Normalisation in training mode uses the biased
    variance, exactly as torch does. Evaluation mode uses the stored statistics as they are.
  * `momentum` is flax's: `running = momentum * running + (1 - momentum) * batch`, so torch's 0.1 is 0.9.
  * With `num_groups = G`, the batch axis is split into G contiguous groups, each normalised with its own
    mean and variance. The running statistics are updated with the mean over groups of the group
    statistics. Because the update is linear, this equals the average of the running statistics that G
    devices with per-device BatchNorm would each keep (they start equal); it is what we store and export.
  * With `axis_name`, each group's statistics are averaged over that device axis (SyncBN). With both set,
    group g of every device forms one normalisation set: the global batch seen as G ghost groups.
  * Statistics are computed in float32 whatever the compute dtype; the output has dtype `dtype` (or the
    input's dtype when `dtype` is None).
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from insloc_jax.precision import wide

Initializer = Callable[..., jax.Array]


def _group_moments(x, num_groups, axis_name):
    """Per-group mean and (biased) variance over every axis but the channels.

    Args:
      x: [B, ..., C] float32, B divisible by `num_groups`.
      num_groups: G, the number of contiguous groups of the batch axis.
      axis_name: device axis to average the statistics over, or None.

    Returns:
      mean, var: [G, C] float32 each; the number of elements n behind each group's statistics.
    """
    batch, channels = x.shape[0], x.shape[-1]
    if batch % num_groups:
        raise ValueError(f"BatchNorm: batch {batch} is not divisible into {num_groups} ghost groups")
    grouped = x.reshape(num_groups, -1, channels)  # [G, B/G * spatial, C]
    count = grouped.shape[1]
    mean = grouped.mean(axis=1)  # [G, C]
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
        count *= jax.lax.axis_size(axis_name)
    # Two passes (deviation from the final mean) rather than E[x^2] - E[x]^2: no cancellation for
    # post-ReLU activations whose mean is large compared to their spread.
    var = jnp.square(grouped - mean[:, None, :]).mean(axis=1)  # [G, C]
    if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
    return mean, var, count


class BatchNorm(nn.Module):
    """BatchNorm over the last axis with torch-compatible statistics (see the module docstring).

    Attributes:
      use_running_average: evaluation mode (normalise with the stored statistics, update nothing).
      momentum: flax-style decay of the running statistics (torch momentum 0.1 -> 0.9).
      epsilon: added to the variance (torch default 1e-5).
      dtype: output dtype; None keeps the input's.
      param_dtype: dtype of `scale` and `bias`.
      axis_name: device axis for cross-device statistics, or None for per-device statistics.
      num_groups: number of ghost groups the local batch is split into.
      scale_init: initialiser of `scale` (torch: ones).
      bias_init: initialiser of `bias` (torch: zeros).
    """

    use_running_average: Optional[bool] = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    axis_name: Optional[str] = None
    num_groups: int = 1
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None):
        """Normalises `x`.

        Args:
          x: [B, ..., C] features.
          use_running_average: overrides the attribute of the same name when given.

        Returns:
          [B, ..., C] normalised, scaled and shifted features in `dtype`.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        channels = x.shape[-1]
        scale = self.param("scale", self.scale_init, (channels,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (channels,), self.param_dtype)
        work = wide(self.param_dtype)  # float32 statistics, float64 in a float64 run
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), work))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((channels,), work))
        out_dtype = self.dtype or x.dtype
        x32 = x.astype(work)

        if use_running_average:
            y = _normalize(x32, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
            return y.astype(out_dtype)

        mean, var, count = _group_moments(x32, self.num_groups, self.axis_name)  # [G, C] each
        if not self.is_initializing():
            unbiased = var * (count / max(count - 1, 1))
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1.0 - m) * mean.mean(axis=0)
            ra_var.value = m * ra_var.value + (1.0 - m) * unbiased.mean(axis=0)
        grouped = x32.reshape((self.num_groups, -1) + x.shape[1:])  # [G, B/G, ..., C]
        stat_shape = (self.num_groups,) + (1,) * (x.ndim - 1) + (channels,)
        y = _normalize(grouped, mean.reshape(stat_shape), var.reshape(stat_shape), scale, bias, self.epsilon)
        return y.reshape(x.shape).astype(out_dtype)


def _normalize(x, mean, var, scale, bias, epsilon):
    """(x - mean) / sqrt(var + eps) * scale + bias, all float32, statistics broadcast against x."""
    mul = jax.lax.rsqrt(var + epsilon) * scale.astype(x.dtype)
    return (x - mean) * mul + bias.astype(x.dtype)
