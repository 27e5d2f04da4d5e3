"""Colour maps for label visualisation and palette PNGs."""
import numpy as np


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map (VOCdevkit `labelcolormap`): the bits of the class index are
    spread over R, G, B from the most significant bit down, 3 bits per round:
    bit 3j of i -> bit (7-j) of R, bit 3j+1 -> bit (7-j) of G, bit 3j+2 -> bit (7-j) of B."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


# 256x3 uint8: 0 background (0,0,0), 1 aeroplane (128,0,0), ..., 255 ignore (224,224,192).
VOC_PALETTE = voc_palette(256)
