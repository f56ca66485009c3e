"""InsLoc RoI heads and projection MLPs (REFERENCE sections 2 and 5).

* `FPNBoxHead`: 4 x (3x3 conv + BN + ReLU) -> flatten -> fc 1024 + ReLU -> fc 1024 + ReLU -> fc 128,
  named after the original mmdetection head (`shared_convs_{i}/conv|bn`, `shared_fcs_{i}`, `fc_cls`).
* `C4Head`: the res5 stage (`layer4`, stride 2 in its first block) -> global average pool -> projection.
* `ProjectionMLP`: fc -> ReLU -> fc (`fc1`, `fc2`), MoCo v2's 2048 -> 2048 -> 128. The C4 projection is
  not published; this MLP is our choice for it (REFERENCE section 2).
"""

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from insloc_jax.models.layers import (
    BNSettings,
    ConvBN,
    make_norm,
    torch_default_bias_init,
    torch_default_kernel_init,
)
from insloc_jax.models.resnet import STAGE_BLOCKS, ResStage
from insloc_jax.precision import wide


class FPNBoxHead(nn.Module):
    """The shared 4conv-2fc head of the FPN variant, applied to RoI features of every level at once.

    Attributes:
      num_convs, conv_dim: number and width of the 3x3 conv + BN + ReLU layers.
      num_fcs, fc_dim: number and width of the fc + ReLU layers (Xavier-uniform, zero bias).
      out_dim: width of the final projection `fc_cls` (normal(0, out_init_std), zero bias), no activation.
      out_init_std: init std of `fc_cls`; 0.01 in the original.
      dtype: compute dtype.
      bn: BatchNorm settings shared with the rest of the encoder.
    """

    num_convs: int = 4
    conv_dim: int = 256
    num_fcs: int = 2
    fc_dim: int = 1024
    out_dim: int = 128
    dtype: Any = jnp.float32
    bn: BNSettings = BNSettings()
    out_init_std: float = 0.01

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """[R, S, S, C] RoI features -> [R, out_dim] (not normalised)."""
        norm = make_norm(train, self.dtype, self.bn)
        for i in range(self.num_convs):
            x = nn.relu(ConvBN(self.conv_dim, 3, norm, self.dtype, name=f"shared_convs_{i}")(x))
        # Flatten in torch's (C, H, W) order so the first fc's kernel rows line up with the PyTorch
        # weight's columns: export then stays a plain transpose.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # [R, C * S * S]
        for i in range(self.num_fcs):
            x = nn.Dense(
                self.fc_dim, dtype=self.dtype, param_dtype=wide(self.dtype),
                kernel_init=nn.initializers.xavier_uniform(),
                name=f"shared_fcs_{i}",
            )(x)
            x = nn.relu(x)
        return nn.Dense(
            self.out_dim, dtype=self.dtype, param_dtype=wide(self.dtype),
            kernel_init=nn.initializers.normal(self.out_init_std), name="fc_cls",
        )(x)  # [R, out_dim]


class ProjectionMLP(nn.Module):
    """fc1 -> ReLU -> fc2 with torch `nn.Linear` default init (as MoCo v2).

    Attributes:
      hidden_dim: width of fc1 (2048).
      out_dim: width of fc2 (128).
      dtype: compute dtype.
    """

    hidden_dim: int = 2048
    out_dim: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[N, Cin] -> [N, out_dim] (not normalised)."""
        x = nn.Dense(
            self.hidden_dim, dtype=self.dtype, param_dtype=wide(self.dtype), kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(x.shape[-1]), name="fc1",
        )(x)
        x = nn.relu(x)
        return nn.Dense(
            self.out_dim, dtype=self.dtype, param_dtype=wide(self.dtype), kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(self.hidden_dim), name="fc2",
        )(x)


class C4Head(nn.Module):
    """res5 RoI head of the C4 variant: `layer4` -> global average pool -> `projection` MLP.

    Attributes:
      depth: ResNet depth the stage belongs to (its block kind and length).
      width: ResNet base width (res5 bottleneck width is 8 * width).
      mlp_dim, out_dim: projection widths.
      dtype: compute dtype.
      bn: BatchNorm settings shared with the rest of the encoder.
    """

    depth: int = 50
    width: int = 64
    mlp_dim: int = 2048
    out_dim: int = 128
    dtype: Any = jnp.float32
    bn: BNSettings = BNSettings()

    def setup(self):
        block, blocks = STAGE_BLOCKS[self.depth]
        self.layer4 = ResStage(block, blocks[3], self.width * 8, 2, self.dtype, self.bn)
        self.projection = ProjectionMLP(self.mlp_dim, self.out_dim, self.dtype)

    def res5(self, x: jax.Array, train: bool) -> jax.Array:
        """The res5 stage alone: [N, H, W, C4] -> [N, ceil(H/2), ceil(W/2), C5]."""
        return self.layer4(x, train)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """[R, S, S, C4] RoI features (S = 14) -> [R, out_dim] (not normalised)."""
        x = self.layer4(x, train)  # [R, S/2, S/2, C5]
        x = x.astype(wide(x.dtype)).mean(axis=(1, 2))  # [R, C5]
        return self.projection(x)
