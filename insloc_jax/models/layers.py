"""Convolution building blocks with PyTorch's padding and the initialisers the models use.

Every convolution pads explicitly and symmetrically by `kernel // 2`, as `torch.nn.Conv2d(padding=k // 2)`
does. flax's "SAME" padding would pad strided convolutions asymmetrically on even inputs (e.g. (2, 3) for
the 7x7 stride-2 stem), which shifts every feature by a pixel relative to the PyTorch model.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from insloc_jax.models.norm import BatchNorm
from insloc_jax.precision import wide

# Conv init of REFERENCE section 2: normal(0, sqrt(2 / (k * k * out_channels))); jax's "normal"
# distribution is the untruncated one.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# FPN neck convs, as mmdetection's FPN initialises them.
xavier_uniform = nn.initializers.xavier_uniform()


def torch_default_bias_init(fan_in: int) -> Callable[..., jax.Array]:
    """Bias init of `torch.nn.Linear`: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# Weight init of `torch.nn.Linear` (kaiming_uniform with a = sqrt(5)): uniform(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    use_bias: bool = False,
    dtype: Any = jnp.float32,
    kernel_init: Callable[..., jax.Array] = kaiming_fan_out,
    name: Optional[str] = None,
) -> nn.Conv:
    """A 2-D convolution that pads like `torch.nn.Conv2d(k, stride, padding=k // 2)`.

    Args:
      features: output channels.
      kernel: square kernel size k.
      stride: spatial stride.
      use_bias: whether the conv has a bias (False when a norm follows).
      dtype: compute dtype; parameters are float32 (float64 for a float64 run: precision.wide).
      kernel_init: initialiser of the HWIO kernel.
      name: module name (torchvision's, e.g. "conv1").

    Returns:
      An `nn.Conv` mapping [B, H, W, Cin] -> [B, H', W', features].
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=wide(dtype),
        kernel_init=kernel_init,
        name=name,
    )


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm, named `conv` / `bn` like mmcv's ConvModule; no activation.

    Attributes:
      features: output channels.
      kernel: square kernel size.
      norm: BatchNorm constructor with everything but the name bound (mode, axis, groups, dtype).
      dtype: compute dtype of the conv.
      kernel_init: initialiser of the conv kernel.
    """

    features: int
    kernel: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = kaiming_fan_out

    @nn.compact
    def __call__(self, x):
        """[B, H, W, Cin] -> [B, H, W, features]."""
        x = conv(self.features, self.kernel, dtype=self.dtype, kernel_init=self.kernel_init, name="conv")(x)
        return self.norm(name="bn")(x)


@dataclasses.dataclass(frozen=True)
class BNSettings:
    """The BatchNorm settings every normalised module of an encoder shares (see `models/norm.py`).

    Frozen, hence hashable: a Flax module can hold it as one attribute.

    Attributes:
      axis_name: device axis for cross-device statistics (SyncBN), or None (per-device BN).
      num_groups: ghost groups per device batch (one device emulating that many devices' BN).
      momentum: flax-style running-average decay (0.9 = torch's 0.1).
    """

    axis_name: Optional[str] = None
    num_groups: int = 1
    momentum: float = 0.9


def make_norm(train: bool, dtype: Any, bn: BNSettings) -> Callable[..., nn.Module]:
    """Binds every BatchNorm setting but the name (eps 1e-5, as torch's default).

    Args:
      train: normalise with batch statistics and update the running ones (else use the running ones).
      dtype: output dtype of the norm.
      bn: the shared settings.

    Returns:
      A constructor `norm(name=...)` of `insloc_jax.models.norm.BatchNorm`.
    """
    return functools.partial(
        BatchNorm,
        use_running_average=not train,
        momentum=bn.momentum,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=wide(dtype),
        axis_name=bn.axis_name,
        num_groups=bn.num_groups,
    )
