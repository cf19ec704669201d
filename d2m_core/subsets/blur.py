"""Face blurring as DataComp's resharder applies it (`--apply-blur`, img2dataset's BoundingBoxBlurrer).

Boxes are [x1, y1, x2, y2] in [0, 1] of the image. Each box, in pixels (truncated), is grown on every side
by 10% of its larger side ("diagonal" in the original code), clipped to the image, and painted into a
mask; the image and the mask are Gaussian-blurred with sigma = 10% of the largest box's larger side
(kernel 2*ceil(4*sigma)+1), and the blurred image is blended in by the blurred mask. The result is
re-encoded as WebP (quality 100, DataComp's default), which replaces the original image member.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

WEBP_QUALITY = 100
GROW = 0.1  # of the box's larger side, on each side
SIGMA = 0.1  # of the largest box's larger side


class BlurError(ValueError):
    """An image that cannot be decoded or re-encoded for blurring."""


def blur_boxes(image: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """The image (H x W or H x W x C, uint8) with the boxes' regions blurred; unchanged without boxes."""
    if not len(boxes):
        return image
    height, width = image.shape[:2]
    pixels = image.astype(np.float32) / 255.0
    mask = np.zeros_like(pixels)
    largest = 0
    for box in boxes:
        x1, y1, x2, y2 = int(box[0] * width), int(box[1] * height), int(box[2] * width), int(box[3] * height)
        side = max(x2 - x1, y2 - y1)
        largest = max(largest, side)
        grow = GROW * side
        x1, y1, x2, y2 = int(x1 - grow), int(y1 - grow), int(x2 + grow), int(y2 + grow)
        x1, x2 = (int(np.clip(v, 0, width - 1)) for v in (x1, x2))
        y1, y2 = (int(np.clip(v, 0, height - 1)) for v in (y1, y2))
        mask[y1:y2, x1:x2, ...] = 1.0
    sigma = SIGMA * largest
    kernel = int(2 * np.ceil(4 * sigma)) + 1
    blurred = cv2.GaussianBlur(pixels, (kernel, kernel), sigma)
    weights = cv2.GaussianBlur(mask, (kernel, kernel), sigma)
    if weights.ndim < pixels.ndim:  # cv2 drops a trailing channel axis of size 1
        weights, blurred = weights.reshape(pixels.shape), blurred.reshape(pixels.shape)
    return ((pixels * (1 - weights) + blurred * weights) * 255.0).astype(np.uint8)


def blur_encoded(data: bytes, boxes: Sequence[Sequence[float]], quality: int = WEBP_QUALITY) -> bytes:
    """Decode an encoded image, blur its boxes, and return it as WebP bytes."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise BlurError("cannot decode the image to blur it")
    if image.dtype != np.uint8:  # 16-bit PNGs: to 8 bits, as WebP holds
        image = (image / 257).astype(np.uint8)
    ok, encoded = cv2.imencode(".webp", blur_boxes(image, boxes), [int(cv2.IMWRITE_WEBP_QUALITY), quality])
    if not ok:
        raise BlurError("cannot encode the blurred image as WebP")
    return encoded.tobytes()
