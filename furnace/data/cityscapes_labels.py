"""The official Cityscapes label table (cityscapesScripts `labels.py`), reduced to what training needs."""
import numpy as np

from .transforms import IGNORE_INDEX

# (name, labelId, trainId, color) for the 19 evaluated classes; every other labelId maps to IGNORE_INDEX (255).
CITYSCAPES_CLASSES = [
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("pole", 17, 5, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
]
CITYSCAPES_CLASS_NAMES = [c[0] for c in CITYSCAPES_CLASSES]
CITYSCAPES_PALETTE = np.array([c[3] for c in CITYSCAPES_CLASSES], dtype=np.uint8)

# labelIds run from -1 (license plate) to 33; the PNGs store 0..33. A 256-entry lookup table.
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _name, _label_id, _train_id, _color in CITYSCAPES_CLASSES:
    LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id
TRAIN_ID_TO_LABEL_ID = np.array([c[1] for c in CITYSCAPES_CLASSES], dtype=np.uint8)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map an HxW array of official labelIds to train ids (0..18, 255 for the rest)."""
    return LABEL_ID_TO_TRAIN_ID[label_ids]
