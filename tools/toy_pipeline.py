"""The main job on the toy dataset: CPS teachers, the ResNet-18 student with MGD and supervised-only,
evaluation of all, and the results table, plot and prediction grid in img/.

    python tools/toy_pipeline.py [--out runs/toy] [--img img] [key=value ...]

Interrupt it at any point and run it again: finished stages are skipped, an interrupted one resumes.
"""
import argparse
import os.path as osp
import time

from furnace.config import REPO_ROOT
from furnace.toy import main_stages, run_pipeline, write_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=osp.join(REPO_ROOT, "runs", "toy"), help="where the stages write")
    parser.add_argument("--img", default=osp.join(REPO_ROOT, "img"), help="where the table and figures go")
    parser.add_argument("--nproc", type=int, default=1, help="processes per stage (torchrun)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every stage")
    args = parser.parse_args(argv)
    start = time.time()
    records = run_pipeline(main_stages(), args.out, args.overrides, args.nproc)
    table = write_report(records, args.img, time.time() - start, args.overrides)
    print("\n" + table)
    with open(osp.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
