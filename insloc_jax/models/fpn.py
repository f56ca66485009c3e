"""FPN neck with BatchNorm: C2..C5 -> P2..P5 (REFERENCE section 2, FPN variant).

Lateral 1x1 conv + BN and output 3x3 conv + BN (no conv bias, no activation anywhere), a top-down path of
nearest 2x upsampling and addition, and no extra levels. Submodules are named after mmdetection's FPN
(`lateral_convs_{i}` / `fpn_convs_{i}`, each with `conv` and `bn`), i = 0..3 for P2..P5.
"""

from typing import Any, Dict

import jax
import jax.numpy as jnp
import flax.linen as nn

from insloc_jax.models.layers import BNSettings, ConvBN, make_norm, xavier_uniform

LEVELS = ("2", "3", "4", "5")


def upsample_nearest_2x(x: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest-neighbour 2x upsampling cropped to (height, width).

    mmdetection's FPN calls `F.interpolate(size=finer_size, mode="nearest")`, which reads input pixel
    floor(i * h / height). For the ceil-halved sizes a ResNet produces (h = ceil(height / 2)) that is
    i // 2 for every i, so repeat-and-crop is exact for any input size, not only multiples of 32.

    Args:
      x: [B, h, w, C].
      height, width: size of the finer level, at most 2h x 2w.

    Returns:
      [B, height, width, C].
    """
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2h, 2w, C]
    return x[:, :height, :width]


class FPN(nn.Module):
    """Feature pyramid with BatchNorm.

    Attributes:
      out_channels: channels of every pyramid level (256 in the paper).
      dtype: compute dtype.
      bn: BatchNorm settings shared with the rest of the encoder.
    """

    out_channels: int = 256
    dtype: Any = jnp.float32
    bn: BNSettings = BNSettings()

    @nn.compact
    def __call__(self, features: Dict[str, jax.Array], train: bool) -> Dict[str, jax.Array]:
        """Builds P2..P5.

        Args:
          features: {"res2": [B, H/4, W/4, C2], ..., "res5": [B, H/32, W/32, C5]}.
          train: BatchNorm in training mode if True.

        Returns:
          {"p2": [B, H/4, W/4, out_channels], ..., "p5": [B, H/32, W/32, out_channels]}.
        """
        norm = make_norm(train, self.dtype, self.bn)
        laterals = [
            ConvBN(self.out_channels, 1, norm, self.dtype, xavier_uniform, name=f"lateral_convs_{i}")(
                features[f"res{level}"]
            )
            for i, level in enumerate(LEVELS)
        ]
        # Top-down: from P5 to P2, each lateral receives the upsampled sum of the coarser ones.
        for i in range(len(laterals) - 1, 0, -1):
            finer = laterals[i - 1]
            laterals[i - 1] = finer + upsample_nearest_2x(laterals[i], finer.shape[1], finer.shape[2])
        return {
            f"p{level}": ConvBN(
                self.out_channels, 3, norm, self.dtype, xavier_uniform, name=f"fpn_convs_{i}"
            )(laterals[i])
            for i, level in enumerate(LEVELS)
        }
