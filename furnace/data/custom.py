"""Your own data: a folder of images and label PNGs with a class-name file (dataset type 'custom').

    ROOT/images/NAME.jpg|.jpeg|.png   RGB images
    ROOT/labels/NAME.png              class indices: a single-channel PNG, or a palette ('P') PNG whose
                                      indices are the classes (its colours are ignored); 255 = ignore
    ROOT/classes.txt                  one class name per line, class 0 first
    ROOT/palette.txt                  optional: one 'R G B' line per class (0..255), for coloured predictions
    ROOT/lists/                       train.txt, val.txt and the partitions, written by tools/prepare_custom.py

These readers are shared by the dataset, the config (which takes num_classes, class_names and palette from
the data root) and the preparer; every error names the file (and line)."""
from pathlib import Path
from typing import List, Optional

CLASSES_FILE = "classes.txt"
PALETTE_FILE = "palette.txt"
IMAGE_DIR, LABEL_DIR = "images", "labels"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def read_class_names(path) -> List[str]:
    """Class names, one per line (blank lines and '#' comments skipped): 2 to 254, each once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path} (one class name per line, class 0 first)")
    names = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not 2 <= len(names) <= 254:
        raise ValueError(f"{path} names {len(names)} classes; expected 2 to 254 (255 is the ignore value)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{path} names some classes twice: {', '.join(twice[:5])}")
    return names


def read_palette(path, num_classes: int) -> List[List[int]]:
    """Colours of the classes, one 'R G B' line each (0..255), at least one per class."""
    path = Path(path)
    colours = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        try:
            rgb = [int(v) for v in line.split()]
        except ValueError:
            rgb = []
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise ValueError(f"{path}:{n}: expected 'R G B' with values 0..255, got {line!r}")
        colours.append(rgb)
    if len(colours) < num_classes:
        raise ValueError(f"{path} has {len(colours)} colours for {num_classes} classes")
    return colours


def dataset_classes(root) -> dict:
    """num_classes, class_names and palette (None without palette.txt) of the custom dataset at `root`."""
    root = Path(root)
    names = read_class_names(root / CLASSES_FILE)
    palette = read_palette(root / PALETTE_FILE, len(names)) if (root / PALETTE_FILE).is_file() else None
    return dict(num_classes=len(names), class_names=names, palette=palette)


def name_of(token: str) -> str:
    """The item name of a list entry: NAME, or an image path (images/NAME.jpg) whose file name it is."""
    base = token.split()[0].rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return stem if dot and stem and f".{ext.lower()}" in IMAGE_EXTENSIONS else base


def image_file(root, name: str) -> Optional[Path]:
    """ROOT/images/NAME with the first extension of IMAGE_EXTENSIONS that exists, else None."""
    for ext in IMAGE_EXTENSIONS:
        p = Path(root) / IMAGE_DIR / f"{name}{ext}"
        if p.is_file():
            return p
    return None
