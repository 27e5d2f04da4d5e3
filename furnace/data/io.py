"""Reading images and label maps from disk, with errors that name the offending file.

Images are decoded with OpenCV (fast JPEG/PNG) and returned RGB. Label maps are read with Pillow, because
VOC `SegmentationClass` PNGs are palette ('P' mode) images whose *indices* are the class ids: converting
them to RGB (what cv2.imread does) would give colours, not classes.
"""
from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np
from PIL import Image

# Single-channel modes whose pixel values are class indices. 'P' is handled apart (indices, not colours).
_INDEX_MODES = ("L", "I;16", "I;16B", "I;16L", "I")


def read_image(path) -> np.ndarray:
    """HxWx3 uint8 RGB image. Missing, unreadable or undecodable files raise an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    # np.fromfile + imdecode also works for non-ASCII paths, where cv2.imread silently fails.
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(f"cannot decode image (corrupt or not an image): {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path) -> np.ndarray:
    """HxW uint8 class indices from a label PNG.

    Palette ('P') PNG -> its palette indices (VOC SegmentationClass style); single-channel PNG -> its values
    (SegmentationClassAug / Cityscapes labelIds style). An RGB(A) colour label is rejected: its colours
    would have to be mapped back to classes, which is ambiguous, so convert it first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label not found: {path}")
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode == "P" or mode in _INDEX_MODES:
                arr = np.array(img)  # for 'P' this is the index array, the palette is not applied
            else:
                arr = None
    except Exception as e:  # PIL raises several types for truncated / foreign files
        raise ValueError(f"cannot read label image {path}: {e}") from e
    if arr is None:
        raise ValueError(
            f"label {path} is a {mode!r} image; expected a palette ('P') PNG or a single-channel index PNG "
            f"holding class ids (colour-coded RGB labels are not supported)")
    if arr.ndim != 2:
        raise ValueError(f"label {path} has shape {arr.shape}; expected HxW class indices")
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"label {path} has values outside 0..255 (min {arr.min()}, max {arr.max()})")
        arr = arr.astype(np.uint8)
    return arr


def write_label(path, label: np.ndarray, palette: Optional[np.ndarray] = None) -> None:
    """Write HxW uint8 class indices as PNG: a palette PNG when `palette` (Nx3 uint8) is given, else a
    single-channel (greyscale) PNG. Both read back identically with read_label."""
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"write_label({path}): expected an HxW uint8 array, got {label.dtype} {label.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette is None:
        Image.fromarray(label).save(path)  # 2-D uint8 -> mode 'L'
    else:
        h, w = label.shape
        img = Image.frombytes("P", (w, h), np.ascontiguousarray(label).tobytes())
        img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
        img.save(path)


def image_size(path) -> Tuple[int, int]:
    """(height, width) from the file header only (no full decode): used to scan a dataset quickly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception as e:
        raise ValueError(f"cannot read image header (corrupt or not an image): {path}: {e}") from e
    return h, w
