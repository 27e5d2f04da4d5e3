#!/usr/bin/env python
"""Write seeded labeled/unlabeled partitions of a training list.

  python tools/make_splits.py DATA/pascal_voc/lists/train_aug.txt --out-dir DATA/pascal_voc/lists \
      --partitions 16 8 4 2 --seed 0

writes OUT_DIR/labeled_1-D.txt and OUT_DIR/unlabeled_1-D.txt for each D; |labeled| = len(list) // D.
The same list and seed always give the same files (the choice depends on the sorted names and the seed)."""
import argparse
import sys
from pathlib import Path

from furnace.data.splits import PARTITIONS, read_list, write_partitions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train_list", help="training list, one name per line")
    ap.add_argument("--out-dir", default=None, help="where to write the lists (default: the list's folder)")
    ap.add_argument("--partitions", type=int, nargs="+", default=list(PARTITIONS),
                    help="denominators D of the labeled fractions 1/D (default: 16 8 4 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = read_list(args.train_list)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.train_list).parent
    for path in write_partitions(names, out_dir, args.partitions, args.seed):
        print(f"wrote {path} ({len(read_list(path))} names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
