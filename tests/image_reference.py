"""Numpy image references for the data tests, written from their definitions."""
import numpy as np


def np_bilinear(image, out_h, out_w):
    """Bilinear resize with half-pixel centres and edge clamping (cv2 INTER_LINEAR semantics), float64.

    Args:
      image: [H, W, C] array.
      out_h, out_w: output size.

    Returns:
      [out_h, out_w, C] float64.
    """
    in_h, in_w = image.shape[:2]
    ys = np.clip((np.arange(out_h) + 0.5) * in_h / out_h - 0.5, 0, in_h - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * in_w / out_w - 0.5, 0, in_w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, in_h - 1), np.minimum(x0 + 1, in_w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy
