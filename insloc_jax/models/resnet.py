"""ResNet-18/34/50/101 with torchvision's structure, parameter names and padding.

Parameter paths mirror torchvision's state-dict names (`conv1`, `bn1`, `layer1/0/conv1`,
`layer1/0/downsample/0`, ...), so export is a rename plus the kernel layout rule. The stride of a stage
sits on the 3x3 conv of its first block (torchvision / "ResNet v1.5", detectron2 `STRIDE_IN_1X1: False`).
Convs are initialised normal(0, sqrt(2 / (k * k * out))), BatchNorm scale 1 and bias 0, and no residual
BatchNorm is zero-initialised (REFERENCE section 2).
"""

from typing import Any, Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from insloc_jax.models.layers import BNSettings, conv, make_norm

# depth -> (block kind, blocks per stage)
STAGE_BLOCKS: Dict[int, Tuple[str, Sequence[int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


class Downsample(nn.Module):
    """Projection shortcut, torchvision's `downsample` Sequential: `0` = 1x1 conv, `1` = BatchNorm."""

    features: int
    stride: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """[B, H, W, Cin] -> [B, H/stride, W/stride, features]."""
        x = conv(self.features, 1, self.stride, dtype=self.dtype, name="0")(x)
        return self.norm(name="1")(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the stride sits on the first."""

    planes: int
    stride: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """[B, H, W, Cin] -> [B, H/stride, W/stride, planes]."""
        identity = x
        y = conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv(self.planes, 3, dtype=self.dtype, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.planes:
            identity = Downsample(self.planes, self.stride, self.norm, self.dtype, name="downsample")(x)
        return nn.relu(y + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck (ResNet-50/101), output 4 * planes channels."""

    planes: int
    stride: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """[B, H, W, Cin] -> [B, H/stride, W/stride, 4 * planes]."""
        out_features = self.planes * EXPANSION["bottleneck"]
        identity = x
        y = conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = conv(out_features, 1, dtype=self.dtype, name="conv3")(y)
        y = self.norm(name="bn3")(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            identity = Downsample(out_features, self.stride, self.norm, self.dtype, name="downsample")(x)
        return nn.relu(y + identity)


class ResStage(nn.Module):
    """One stage (torchvision `layerN`): blocks named `0`, `1`, ...; the first carries the stride.

    Also serves as the res5 RoI head of the C4 architecture.

    Attributes:
      block: "basic" or "bottleneck".
      num_blocks: number of residual blocks.
      planes: bottleneck width (output channels are planes * expansion).
      stride: stride of the first block.
      dtype: compute dtype.
      bn: BatchNorm settings shared with the rest of the encoder.
    """

    block: str
    num_blocks: int
    planes: int
    stride: int
    dtype: Any = jnp.float32
    bn: BNSettings = BNSettings()

    @nn.compact
    def __call__(self, x, train: bool):
        """[B, H, W, Cin] -> [B, H/stride, W/stride, planes * expansion]."""
        norm = make_norm(train, self.dtype, self.bn)
        block_cls = BasicBlock if self.block == "basic" else Bottleneck
        for i in range(self.num_blocks):
            x = block_cls(self.planes, self.stride if i == 0 else 1, norm, self.dtype, name=str(i))(x)
        return x


class ResNet(nn.Module):
    """torchvision ResNet without `avgpool` / `fc`, returning the stage outputs.

    Attributes:
      depth: 18, 34, 50 or 101.
      num_stages: 4 (res2..res5) or 3 (stop after res4: the C4 backbone, whose res5 is the RoI head).
      width: channels of the stem and of the first stage's bottleneck (torchvision: 64).
      dtype: compute dtype (e.g. bfloat16); parameters and BatchNorm statistics stay float32.
      bn: BatchNorm settings shared with the rest of the encoder.
    """

    depth: int = 50
    num_stages: int = 4
    width: int = 64
    dtype: Any = jnp.float32
    bn: BNSettings = BNSettings()

    @nn.compact
    def __call__(self, x, train: bool) -> Dict[str, jax.Array]:
        """Runs the stem and the first `num_stages` stages.

        Args:
          x: [B, H, W, 3] normalised images.
          train: BatchNorm with batch statistics (and running-stat updates) if True.

        Returns:
          {"res2": [B, H/4, W/4, C2], "res3": [.., H/8, ..], "res4": [.., H/16, ..], "res5": [.., H/32, ..]}
          (ceil-divided sizes; no "res5" when num_stages == 3). C2..C5 = 256..2048 for ResNet-50.
        """
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {self.depth}")
        block, blocks = STAGE_BLOCKS[self.depth]
        norm = make_norm(train, self.dtype, self.bn)
        x = x.astype(self.dtype)
        x = conv(self.width, 7, 2, dtype=self.dtype, name="conv1")(x)  # [B, H/2, W/2, width]
        x = nn.relu(norm(name="bn1")(x))
        # torch MaxPool2d(3, 2, padding=1) pads with -inf, as flax's max_pool does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # [B, H/4, W/4, width]
        outputs = {}
        for i in range(self.num_stages):
            x = ResStage(
                block, blocks[i], self.width * 2**i, 1 if i == 0 else 2, self.dtype, self.bn,
                name=f"layer{i + 1}",
            )(x, train)
            outputs[f"res{i + 2}"] = x
        return outputs


def stage_channels(depth: int, width: int = 64) -> Dict[str, int]:
    """Output channels of res2..res5, e.g. {"res2": 256, ..., "res5": 2048} for ResNet-50."""
    block, _ = STAGE_BLOCKS[depth]
    return {f"res{i + 2}": width * 2**i * EXPANSION[block] for i in range(4)}
