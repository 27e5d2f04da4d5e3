"""Seeded labeled/unlabeled partitions of a training list (1/16, 1/8, 1/4, 1/2 labeled)."""
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

PARTITIONS = (16, 8, 4, 2)


def read_list(path) -> List[str]:
    """Names in a split list, one per line; blank lines and '#' comments skipped.
    An absent or empty list is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    names = [ln.strip() for ln in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ValueError(f"split list is empty: {path}")
    return names


def write_list(path, names: Sequence[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names))


def partition(names: Sequence[str], denominator: int, seed: int = 0) -> Tuple[List[str], List[str]]:
    """Split `names` into (labeled, unlabeled) with len(labeled) = len(names) // denominator.

    The choice depends only on the sorted names and the seed, so the same seed gives the same lists
    whatever order the input came in. Both parts keep the sorted order."""
    if denominator < 1:
        raise ValueError(f"partition denominator must be >= 1, got {denominator}")
    ordered = sorted(set(names))
    if len(ordered) != len(names):
        raise ValueError("training list has duplicate names")
    n_labeled = len(ordered) // denominator
    if n_labeled == 0:
        raise ValueError(f"1/{denominator} of {len(ordered)} images leaves no labeled image")
    rng = np.random.default_rng(seed)
    chosen = set(rng.permutation(len(ordered))[:n_labeled].tolist())
    labeled = [n for i, n in enumerate(ordered) if i in chosen]
    unlabeled = [n for i, n in enumerate(ordered) if i not in chosen]
    return labeled, unlabeled


def partition_paths(list_dir, denominator: int) -> Tuple[Path, Path]:
    """Where the lists of partition 1/denominator live: lists/labeled_1-8.txt, lists/unlabeled_1-8.txt."""
    list_dir = Path(list_dir)
    return list_dir / f"labeled_1-{denominator}.txt", list_dir / f"unlabeled_1-{denominator}.txt"


def write_partitions(names: Sequence[str], list_dir, denominators: Sequence[int] = PARTITIONS,
                     seed: int = 0) -> List[Path]:
    """Write labeled_1-d.txt / unlabeled_1-d.txt under list_dir for each denominator d (see partition).
    Returns the paths written."""
    written = []
    for d in denominators:
        labeled, unlabeled = partition(names, d, seed)
        lab_path, unl_path = partition_paths(list_dir, d)
        write_list(lab_path, labeled)
        write_list(unl_path, unlabeled)
        written += [lab_path, unl_path]
    return written
