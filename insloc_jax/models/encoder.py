"""The InsLoc / MoCo-v2 encoders: images (+ boxes) -> L2-normalised embeddings [B, L, dim].

Three architectures (REFERENCE sections 2 and 5):
  fpn:  ResNet -> FPN (P2..P5) -> RoIAlign 7x7 of box l on level P(l+2) -> shared 4conv-2fc head; L = 4.
  c4:   ResNet up to res4 -> RoIAlign 14x14 (stride 16) -> res5 head -> pool -> MLP; L = 1.
  moco: ResNet -> global average pool -> MLP 2048-2048-128 (boxes are ignored); L = 1.

Variables: `backbone` (torchvision names; no `layer4` for c4), then `neck` + `head` (fpn), `head` with
`layer4` + `projection` (c4) or `projection` (moco). BatchNorm statistics live in `batch_stats`.

Besides `__call__`, two methods expose intermediate maps for probes and parity checks, through
`Encoder.apply(variables, images, train=False, method=Encoder.features)` (or `Encoder.pyramid`):
  features: {"res2", .., "res5"} for every architecture (for c4, res5 runs the head's res5 stage on the
            whole res4 map, i.e. the same network torchvision would run with the exported weights).
  pyramid:  {"p2", .., "p5"} (fpn only).
"""

import math
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from insloc_jax.models.fpn import FPN
from insloc_jax.models.heads import C4Head, FPNBoxHead, ProjectionMLP
from insloc_jax.models.layers import BNSettings
from insloc_jax.models.resnet import ResNet
from insloc_jax.ops.roi_align import default_max_grid, roi_align
from insloc_jax.precision import wide

ARCHS = ("fpn", "c4", "moco")
NUM_LEVELS = {"fpn": 4, "c4": 1, "moco": 1}
FPN_STRIDES = (4, 8, 16, 32)  # P2..P5
C4_STRIDE = 16


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis, as torch's `F.normalize`."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class Encoder(nn.Module):
    """Query / key encoder of InsLoc (fpn, c4) or MoCo v2 (moco).

    Attributes:
      arch: "fpn", "c4" or "moco".
      depth: ResNet depth (18, 34, 50, 101).
      dim: embedding width (128).
      width: ResNet base width (64).
      fpn_dim: FPN channels (256).
      head_convs, head_conv_dim: conv layers of the FPN head (4 x 256).
      head_fcs, head_fc_dim: fc layers of the FPN head (2 x 1024).
      head_out_init_std: init std of the FPN head's final fc (0.01 in the original).
      mlp_dim: hidden width of the c4 / moco projection MLP (2048).
      roi_size: RoIAlign output side; None means 7 for fpn and 14 for c4.
      sampling_ratio: RoIAlign samples per bin side; 0 = adaptive ceil(roi_size / output_size).
      roi_max_side: the largest box side (input pixels) the encoder will pool, which bounds the adaptive
        samples per bin statically; 0 = the feature map's side (exact for boxes inside the image; a
        box-augmented anchor can be larger, see config.encoder_kwargs).
      dtype: compute dtype (float32, bfloat16, or float64 for verification); parameters and BN statistics
        stay float32 (float64 for float64) and the embeddings are returned in float32 (float64).
      bn_axis_name: device axis for cross-device BatchNorm statistics, or None (per-device BN).
      bn_num_groups: ghost groups per device batch (one device emulating that many devices' BN).
      bn_momentum: flax-style BN momentum (0.9 = torch's 0.1).
    """

    arch: str
    depth: int = 50
    dim: int = 128
    width: int = 64
    fpn_dim: int = 256
    head_convs: int = 4
    head_conv_dim: int = 256
    head_fcs: int = 2
    head_fc_dim: int = 1024
    head_out_init_std: float = 0.01
    mlp_dim: int = 2048
    roi_size: Optional[int] = None
    sampling_ratio: int = 0
    roi_max_side: float = 0.0
    dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None
    bn_num_groups: int = 1
    bn_momentum: float = 0.9

    def setup(self):
        if self.arch not in ARCHS:
            raise ValueError(f"Encoder arch must be one of {ARCHS}, got {self.arch!r}")
        # Compute dtype and BatchNorm settings, the same for every normalised part.
        bn = BNSettings(self.bn_axis_name, self.bn_num_groups, self.bn_momentum)
        shared = dict(dtype=self.dtype, bn=bn)
        self.backbone = ResNet(self.depth, 3 if self.arch == "c4" else 4, self.width, **shared)
        if self.arch == "fpn":
            self.neck = FPN(self.fpn_dim, **shared)
            self.head = FPNBoxHead(
                self.head_convs, self.head_conv_dim, self.head_fcs, self.head_fc_dim, self.dim, **shared,
                out_init_std=self.head_out_init_std,
            )
        elif self.arch == "c4":
            self.head = C4Head(self.depth, self.width, self.mlp_dim, self.dim, **shared)
        else:
            self.projection = ProjectionMLP(self.mlp_dim, self.dim, self.dtype)

    @property
    def num_levels(self) -> int:
        """L, the number of embeddings per image."""
        return NUM_LEVELS[self.arch]

    def features(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        """Backbone stage outputs {"res2": [B, H/4, W/4, C2], ..., "res5": [B, H/32, W/32, C5]}."""
        feats = self.backbone(images, train)
        if self.arch == "c4":
            feats = dict(feats, res5=self.head.res5(feats["res4"], train))
        return feats

    def pyramid(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        """FPN outputs {"p2": [B, H/4, W/4, fpn_dim], ..., "p5": [B, H/32, W/32, fpn_dim]} (fpn only)."""
        if self.arch != "fpn":
            raise ValueError(f"pyramid() needs arch 'fpn', this encoder is {self.arch!r}")
        return self.neck(self.backbone(images, train), train)

    def __call__(self, images: jax.Array, boxes_xyxy: jax.Array, train: bool) -> jax.Array:
        """Embeds one instance per image (one box per level).

        Args:
          images: [B, H, W, 3] normalised images.
          boxes_xyxy: [B, L, 4] float32 boxes in input-pixel coordinates; level l of fpn uses
            boxes_xyxy[:, l] on P(l+2); c4 uses boxes_xyxy[:, 0]; moco ignores them (L may be 1).
          train: BatchNorm with batch statistics (and running-stat updates, mutable "batch_stats").

        Returns:
          [B, L, dim] float32 L2-normalised embeddings.
        """
        if self.arch == "fpn":
            emb = self._embed_fpn(images, boxes_xyxy, train)
        elif self.arch == "c4":
            emb = self._embed_c4(images, boxes_xyxy, train)
        else:
            res5 = self.backbone(images, train)["res5"]
            pooled = res5.astype(wide(res5.dtype)).mean(axis=(1, 2))  # [B, C5]
            emb = self.projection(pooled)[:, None, :]  # [B, 1, dim]
        return l2_normalize(emb.astype(wide(emb.dtype)))

    def _embed_fpn(self, images, boxes_xyxy, train):
        """[B, H, W, 3], [B, 4, 4] -> [B, 4, dim] head outputs."""
        pyramid = self.neck(self.backbone(images, train), train)
        size = self.roi_size or 7
        rois = [
            self._pool(pyramid[f"p{i + 2}"], boxes_xyxy[:, i], size, 1.0 / stride)
            for i, stride in enumerate(FPN_STRIDES)
        ]
        # Image-major order [B, L] -> [B * L], as the original stacks levels per RoI: a contiguous
        # BatchNorm ghost group then holds whole images, like one device's batch would.
        rois = jnp.stack(rois, axis=1)  # [B, 4, S, S, fpn_dim]
        batch = rois.shape[0]
        out = self.head(rois.reshape((batch * len(FPN_STRIDES),) + rois.shape[2:]), train)  # [B*4, dim]
        return out.reshape(batch, len(FPN_STRIDES), -1)

    def _embed_c4(self, images, boxes_xyxy, train):
        """[B, H, W, 3], [B, L, 4] -> [B, 1, dim] head outputs."""
        res4 = self.backbone(images, train)["res4"]
        rois = self._pool(res4, boxes_xyxy[:, 0], self.roi_size or 14, 1.0 / C4_STRIDE)  # [B, S, S, C4]
        return self.head(rois, train)[:, None, :]

    def _pool(self, feature_map, boxes, size, scale):
        """One box per image: [B, h, w, C], [B, 4] -> [B, size, size, C]."""
        # batch_indices None: box b belongs to image b, so no per-box image gather is needed.
        bound = default_max_grid(feature_map.shape[1:3], (size, size))
        if self.roi_max_side:  # as many samples per bin as the largest box needs (cheap: weights only)
            bound = max(bound, math.ceil(self.roi_max_side * scale / size))
        return roi_align(
            feature_map, boxes, None, (size, size), scale,
            sampling_ratio=self.sampling_ratio, aligned=True, max_grid=bound,
        )
