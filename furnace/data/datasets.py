"""PASCAL VOC, Cityscapes and custom (your own folder, furnace/data/custom.py) segmentation datasets,
up-front dataset checks and build_dataset(C, split).

Indexing contract: ds[i] or ds[(i, rng_key)] with rng_key a tuple of non-negative ints. The augmentation
of that sample is drawn only from np.random.default_rng(rng_key) (plain int i -> key (i,)), so it is a
pure function of the key: exact resume, and identical batches whether 1 or N processes load them."""
import copy
import operator
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from furnace.config import config_value

from . import custom
from .cityscapes_labels import LABEL_ID_TO_TRAIN_ID
from .io import image_size, read_image, read_label
from .splits import read_list
from .transforms import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, TrainTransform, ValTransform

MODES = ("labeled", "unlabeled", "val")
CITYSCAPES_MAX_LABEL_ID = 33  # official labelIds run 0..33 (license plate -1 is stored as 255)


class DatasetError(ValueError):
    """One or more problems found by check_dataset; the message lists them with their files."""


class SegmentationDataset(Dataset):
    """Common part: a list of names, a mode and a transform. Subclasses say where files are and how a
    label file becomes class indices."""

    def __init__(self, root, list_file, mode: str = "labeled", num_classes: int = 21,
                 transform: Optional[Callable] = None, names: Optional[Sequence[str]] = None):
        """names: the items themselves instead of reading list_file (which then only names them in
        messages), for checking files before any list is written."""
        if mode not in MODES:
            raise ValueError(f"dataset mode must be one of {MODES}, got {mode!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {self.root}")
        self.list_file = Path(list_file)
        self.names: List[str] = [self._parse_name(n) for n in (read_list(self.list_file) if names is None else names)]
        self.mode, self.num_classes = mode, int(num_classes)
        # no transform given: normalise only (the val transform), whatever the mode
        self.transform = transform if transform is not None else ValTransform()
        # role -> folder of per-image label maps (offline teachers, furnace.teacher_labels): each is loaded
        # with the image and augmented exactly as a label is, returned as sample['teacher_<role>']
        self.teacher_label_dirs: Dict[str, Path] = {}

    def with_teacher_labels(self, root, roles: Sequence[str] = ("deep", "wide")) -> "SegmentationDataset":
        """A copy of this dataset whose samples also hold each teacher's map root/<role>/<name>.png as
        'teacher_<role>', augmented with the image (the offline teachers of furnace.teacher_labels)."""
        out = copy.copy(self)
        out.teacher_label_dirs = {role: Path(root) / role for role in roles}
        return out

    # ---- to override -------------------------------------------------------------------------------
    def _parse_name(self, line: str) -> str:
        return line

    def image_path(self, name: str) -> Path:
        raise NotImplementedError

    def label_path(self, name: str) -> Path:
        raise NotImplementedError

    def _raw_to_classes(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Label file values -> class indices (0..num_classes-1, 255 ignore)."""
        return raw

    # ---- loading -----------------------------------------------------------------------------------
    def load_label(self, name: str) -> np.ndarray:
        """HxW uint8 class indices of `name`, checked: values in [0, num_classes) or 255."""
        path = self.label_path(name)
        label = self._raw_to_classes(read_label(path), path)
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            values = np.unique(label[bad]).tolist()
            raise ValueError(f"label {path} has values {values[:10]} outside [0, {self.num_classes}) "
                             f"and not {IGNORE_INDEX} (num_classes={self.num_classes})")
        return label

    def load(self, name: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(RGB image, label or None in unlabeled mode), with the image/label size check."""
        image_file = self.image_path(name)
        image = read_image(image_file)
        if self.mode == "unlabeled":
            return image, None
        label = self.load_label(name)
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image_file} is {image.shape[0]}x{image.shape[1]} but its label "
                             f"{self.label_path(name)} is {label.shape[0]}x{label.shape[1]}")
        return image, label

    def __len__(self) -> int:
        return len(self.names)

    def _resolve_index(self, index) -> Tuple[int, Tuple[int, ...]]:
        if isinstance(index, (tuple, list)):
            if len(index) != 2:
                raise TypeError(f"dataset index must be an int or (index, rng_key), got {index!r}")
            index, key = index
            key = (operator.index(key),) if not isinstance(key, (tuple, list)) else tuple(map(operator.index, key))
        else:
            key = None
        i = operator.index(index)
        if i < 0:
            i += len(self.names)
        if not 0 <= i < len(self.names):
            raise IndexError(f"index {index} out of range for {len(self.names)} items ({self.list_file})")
        return i, (key if key is not None else (i,))

    def __getitem__(self, index) -> Dict:
        i, key = self._resolve_index(index)
        name = self.names[i]
        image, label = self.load(name)
        rng = np.random.default_rng(key)
        # the label and any offline teacher maps go through the transform as channels of one label array,
        # so one draw of the augmentation moves them all alike
        keys = (["label"] if label is not None else []) + [f"teacher_{r}" for r in self.teacher_label_dirs]
        maps = ([label] if label is not None else []) + [self._teacher_map(d, name, image.shape[:2])
                                                         for d in self.teacher_label_dirs.values()]
        image_t, maps_t = self.transform(image, np.stack(maps, axis=-1) if maps else None, rng)
        sample = dict(image=image_t, name=name)
        if maps:
            maps_t = maps_t.reshape(*image_t.shape[1:], len(maps))
            sample.update((k, maps_t[..., c].contiguous()) for c, k in enumerate(keys))
        return sample

    @staticmethod
    def _teacher_map(folder: Path, name: str, size: Tuple[int, int]) -> np.ndarray:
        path = folder / f"{name}.png"
        m = read_label(path)
        if m.shape != size:
            raise ValueError(f"teacher label {path} is {m.shape[0]}x{m.shape[1]} but its image is "
                             f"{size[0]}x{size[1]}: stale offline labels? delete the folder to recompute them")
        return m

    def validate(self, check_labels: bool = True, workers: Optional[int] = None) -> int:
        """Scan every item's files (see check_dataset); returns the number of items."""
        return check_dataset(self, check_labels=check_labels, workers=workers)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, list={str(self.list_file)!r}, mode={self.mode!r}, "
                f"n={len(self)}, num_classes={self.num_classes}, transform={self.transform!r})")


class VOCDataset(SegmentationDataset):
    """PASCAL VOC layout: root/<split_dir>/image/NAME.jpg, root/<split_dir>/label/NAME.png.

    split_dir defaults to 'val' in val mode, else 'train_aug'. Labels may be palette PNGs
    (SegmentationClass) or single-channel index PNGs (SegmentationClassAug)."""

    def __init__(self, root, list_file, mode: str = "labeled", num_classes: int = 21,
                 transform: Optional[Callable] = None, split_dir: Optional[str] = None):
        super().__init__(root, list_file, mode, num_classes, transform)
        self.split_dir = split_dir or ("val" if mode == "val" else "train_aug")

    def _parse_name(self, line: str) -> str:
        # tolerate lines holding paths ("JPEGImages/2007_000032.jpg SegmentationClassAug/...png")
        token = line.split()[0]
        return Path(token).stem if ("/" in token or "." in token) else token

    def image_path(self, name: str) -> Path:
        return self.root / self.split_dir / "image" / f"{name}.jpg"

    def label_path(self, name: str) -> Path:
        return self.root / self.split_dir / "label" / f"{name}.png"


class CityscapesDataset(SegmentationDataset):
    """Official Cityscapes layout: root/leftImg8bit/SPLIT/CITY/NAME_leftImg8bit.png and
    root/gtFine/SPLIT/CITY/NAME_gtFine_labelIds.png; list entries 'SPLIT/CITY/CITY_SEQ_FRAME'.
    labelIds are always mapped to the 19 train ids (other ids -> 255); *_labelTrainIds.png are not used."""

    def __init__(self, root, list_file, mode: str = "labeled", num_classes: int = 19,
                 transform: Optional[Callable] = None):
        super().__init__(root, list_file, mode, num_classes, transform)
        for n in self.names:
            if n.count("/") != 2:
                raise ValueError(f"Cityscapes list {self.list_file}: entry {n!r} is not 'split/city/city_seq_frame'")

    def _parse_name(self, line: str) -> str:
        name = line.split()[0]
        if name.startswith("leftImg8bit/"):
            name = name[len("leftImg8bit/"):]
        if name.endswith("_leftImg8bit.png"):
            name = name[:-len("_leftImg8bit.png")]
        return name

    def image_path(self, name: str) -> Path:
        return self.root / "leftImg8bit" / f"{name}_leftImg8bit.png"

    def label_path(self, name: str) -> Path:
        return self.root / "gtFine" / f"{name}_gtFine_labelIds.png"

    def _raw_to_classes(self, raw: np.ndarray, path: Path) -> np.ndarray:
        bad = (raw > CITYSCAPES_MAX_LABEL_ID) & (raw != 255)
        if bad.any():
            raise ValueError(f"label {path} has values {np.unique(raw[bad]).tolist()[:10]} that are not "
                             f"Cityscapes labelIds (0..{CITYSCAPES_MAX_LABEL_ID})")
        return LABEL_ID_TO_TRAIN_ID[raw]


class CustomDataset(SegmentationDataset):
    """Your own folder (furnace/data/custom.py): root/images/NAME.jpg|.jpeg|.png, root/labels/NAME.png
    (index or palette PNG: its indices are the classes); list entries are NAMEs, or image paths."""

    def _parse_name(self, line: str) -> str:
        return custom.name_of(line)

    def image_path(self, name: str) -> Path:
        # the path to report when no image exists: the first extension's
        return custom.image_file(self.root, name) or self.root / custom.IMAGE_DIR / f"{name}{custom.IMAGE_EXTENSIONS[0]}"

    def label_path(self, name: str) -> Path:
        return self.root / custom.LABEL_DIR / f"{name}.png"


def _check_item(ds: SegmentationDataset, name: str, check_labels: bool, decode_images: bool = True) -> Optional[str]:
    """The problem with one item as a message naming the file, or None."""
    try:
        # A truncated JPEG (an interrupted copy) has an intact header: only decoding it finds the damage.
        path = ds.image_path(name)
        size = read_image(path).shape[:2] if decode_images else image_size(path)
        if ds.mode != "unlabeled" and check_labels:
            label = ds.load_label(name)
            if label.shape != size:
                return (f"image {ds.image_path(name)} is {size[0]}x{size[1]} but its label "
                        f"{ds.label_path(name)} is {label.shape[0]}x{label.shape[1]}")
        elif ds.mode != "unlabeled" and not ds.label_path(name).is_file():
            return f"label not found: {ds.label_path(name)}"
    except (OSError, ValueError) as e:
        return str(e)
    return None


def check_dataset(ds: SegmentationDataset, check_labels: bool = True, workers: Optional[int] = None,
                  max_report: int = 20, decode_images: bool = True) -> int:
    """Scan all items before training: each image exists and decodes (decode_images=False: only its header
    is read, faster but blind to truncated files); unless the dataset is in unlabeled mode, each label
    exists, is readable, has the image's size and holds only values in [0, num_classes) or 255
    (check_labels=False only checks that label files exist).
    Raises DatasetError listing the problems (each naming its file); returns the number of items."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # OpenCV/PIL/zlib decoding releases the GIL
        problems = [p for p in pool.map(lambda n: _check_item(ds, n, check_labels, decode_images), ds.names) if p]
    if problems:
        shown = "\n  ".join(problems[:max_report])
        more = f"\n  ... and {len(problems) - max_report} more" if len(problems) > max_report else ""
        raise DatasetError(f"{len(problems)} of {len(ds)} items of {ds.list_file} have problems:\n  {shown}{more}")
    return len(ds)


# ---- build from config -----------------------------------------------------------------------------
def _resolve_list(data_root: Path, list_file) -> Path:
    """A list path as given if it exists (absolute, or relative to the working directory), else relative
    to data_root."""
    p = Path(list_file)
    if p.is_absolute() or p.is_file():
        return p
    return data_root / p


def build_dataset(C, split: str) -> SegmentationDataset:
    """Dataset for split 'labeled' | 'unlabeled' | 'val' from config keys C.dataset ('voc' | 'cityscapes' | 'custom'),
    C.data_root, C.labeled_list / C.unlabeled_list / C.val_list, C.num_classes, C.crop_size (int or (h, w)),
    C.train_scales, C.image_mean, C.image_std (0..1 RGB; ImageNet by default).
    Train splits get TrainTransform (flip, scale, normalise, crop), val gets normalisation only."""
    if split not in MODES:
        raise ValueError(f"build_dataset split must be one of {MODES}, got {split!r}")
    kind = str(config_value(C, "dataset")).lower()
    root = Path(config_value(C, "data_root"))
    list_key = {"labeled": "labeled_list", "unlabeled": "unlabeled_list", "val": "val_list"}[split]
    list_file = _resolve_list(root, config_value(C, list_key))
    mean = tuple(config_value(C, "image_mean", IMAGENET_MEAN))
    std = tuple(config_value(C, "image_std", IMAGENET_STD))
    if split == "val":
        transform = ValTransform(mean, std)
    else:
        transform = TrainTransform(config_value(C, "crop_size"), config_value(C, "train_scales", (1.0,)), mean, std)
    num_classes = int(config_value(C, "num_classes"))
    if kind in ("voc", "pascal_voc"):
        return VOCDataset(root, list_file, split, num_classes, transform)
    if kind in ("cityscapes", "city"):
        return CityscapesDataset(root, list_file, split, num_classes, transform)
    if kind == "custom":
        return CustomDataset(root, list_file, split, num_classes, transform)
    raise ValueError(f"config dataset must be 'voc', 'cityscapes' or 'custom', got {kind!r}")
