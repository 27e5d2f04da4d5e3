"""The toy comparison over several seeds, with the MobileNet-v2 student and an ablation of each MGD loss.

    python tools/toy_benchmark.py --seeds 3 [--shared-teachers | --teachers runs/toy] [--only TAGS] [--out runs/toy_bench] [key=value ...]

Per seed (model initialisation, sampling and CutMix all follow `seed`): the two CPS teachers, then
ResNet-18 supervised-only, with MGD in the published setting (the default) and in the fast setting (offline
teachers: pseudo-labels made once per image, kept in <teachers' folder>/teacher_labels and shared by every
student and seed that shares the teachers), the fast setting with each of its choices reverted in turn,
the published setting with each of its opt-in speed-ups (student_bn_calls=False, channels_last=True),
MobileNet-v2 supervised-only and with MGD, then ResNet-18 MGD without each loss term. --only runs a subset.
--shared-teachers trains the teachers once (first seed) and reuses them for every seed, which measures the
students' spread only but costs a third of the time; --teachers DIR takes the finished teachers of an
earlier run instead (e.g. runs/toy, the quickstart's), for every seed. Writes <out>/benchmark.md and
img/toy_benchmark.json (mean and standard deviation of mIoU per configuration). Resumable like the
main job.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import sys
from typing import Dict, List

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # the sibling tool toy_pipeline

from furnace.config import REPO_ROOT  # noqa: E402
from toy_pipeline import Stage, run_stage, student_stages, teacher_overrides, teacher_stages  # noqa: E402

R18, MBV2 = "voc8.resnet18_deeplabv3plus", "voc8.mobilev2_deeplabv3plus"


def benchmark_stages() -> List[Stage]:
    """The main job's stages (teachers, ResNet-18 supervised and MGD in the published setting), ResNet-18 MGD
    in the fast setting and with each of its choices reverted to the published one, the published setting's
    two opt-in speed-ups (student_bn_calls=False, channels_last=True), then MobileNet-v2 and the ablations."""
    fast = ["setting=fast"]
    return [
        *teacher_stages(),
        *student_stages(),
        Stage("ResNet-18 MGD, fast setting", R18, "mgd-fast", fast),
        Stage("fast, online teachers", R18, "mgd-fast-online", fast + ["teacher_labels=online"]),
        Stage("fast, online train-mode teachers", R18, "mgd-fast-online-trainbn",
              fast + ["teacher_labels=online", "teacher_bn=train"]),
        Stage("fast, separate network calls", R18, "mgd-fast-separate", fast + ["network_calls=separate"]),
        Stage("fast, toggled CutMix boxes", R18, "mgd-fast-toggle", fast + ["cutmix_overlap=toggle"]),
        Stage("fast, per-GPU losses", R18, "mgd-fast-pergpu", fast + ["loss_scope=per_gpu"]),
        Stage("ResNet-18 MGD, no student calls on u0, u1", R18, "mgd-no-student-bn-calls",
              ["student_bn_calls=False"]),
        Stage("ResNet-18 MGD, channels-last", R18, "mgd-channels-last", ["channels_last=True"]),
        Stage("MobileNet-v2 supervised", MBV2, "mbv2-supervised", ["method=supervised"]),
        Stage("MobileNet-v2 MGD", MBV2, "mbv2-mgd"),
        Stage("ResNet-18 MGD w/o pixel-level", R18, "mgd-no-pixel",
              ["pixel_unlabeled_weight=0", "pixel_labeled_weight=0"]),
        Stage("ResNet-18 MGD w/o image-level", R18, "mgd-no-semantic", ["semantic_weight=0"]),
        Stage("ResNet-18 MGD w/o region-level", R18, "mgd-no-region", ["region_weight=0"]),
    ]


def summarise(runs: Dict[int, List[dict]]) -> List[dict]:
    """Mean and standard deviation of mIoU over seeds, per configuration (in stage order)."""
    rows = []
    for i, first in enumerate(next(iter(runs.values()))):
        values = [records[i]["miou"] for records in runs.values()]
        rows.append({"label": first["label"], "network": first["network"], "method": first["method"],
                     "miou_mean": statistics.mean(values),
                     "miou_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "miou_per_seed": values, "backbone_gflops": first["backbone_gflops"]})
    return rows


def format_summary(rows: List[dict], seeds: List[int], teachers_note: str = "") -> str:
    lines = [f"mIoU (%) on the toy val set over seeds {seeds}" + (f" ({teachers_note})" if teachers_note else ""), "",
             "| configuration | backbone GFLOPs | mIoU mean | std | per seed |", "|---|--:|--:|--:|---|"]
    for r in rows:
        per_seed = ", ".join(f"{v:.1f}" for v in r["miou_per_seed"])
        lines.append(f"| {r['label']} | {r['backbone_gflops']:.1f} | {r['miou_mean']:.2f} | {r['miou_std']:.2f} "
                     f"| {per_seed} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    teachers = parser.add_mutually_exclusive_group()
    teachers.add_argument("--shared-teachers", action="store_true", help="train the teachers for the first seed only")
    teachers.add_argument("--teachers", help="folder of an earlier run whose finished CPS teachers every seed uses "
                        "(<DIR>/<experiment>/cps/snapshot/last.pth, e.g. runs/toy)")
    parser.add_argument("--out", default=osp.join(REPO_ROOT, "runs", "toy_bench"))
    parser.add_argument("--img", default=osp.join(REPO_ROOT, "img"))
    parser.add_argument("--only", help="comma-separated output tags of the student stages to run (e.g. "
                        "'supervised,mgd,mgd-fast'); the teachers always run. Default: all")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every stage")
    args = parser.parse_args(argv)
    stages = benchmark_stages()
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {s.tag for s in stages}
        if unknown:
            parser.error(f"--only: no stage tagged {', '.join(sorted(unknown))}; tags: "
                         f"{', '.join(s.tag for s in stages if s.role != 'teacher')}")
        stages = [s for s in stages if s.role == "teacher" or (s.tag in wanted)]
    seeds = list(range(args.seeds))
    if args.teachers:
        args.teachers = osp.abspath(args.teachers)
        for override in teacher_overrides(args.teachers):
            path = override.split("=", 1)[1]
            if not osp.isfile(path):
                parser.error(f"--teachers {args.teachers}: no teacher checkpoint {path}")
        note = f"teachers from {args.teachers}, shared"
    else:
        note = "teachers of the first seed shared" if args.shared_teachers else ""
    runs = {}
    for seed in seeds:
        out = osp.join(args.out, f"seed{seed}")
        teacher_out = args.teachers or (osp.join(args.out, f"seed{seeds[0]}") if args.shared_teachers else out)
        records = []
        for stage in stages:
            root = teacher_out if stage.role == "teacher" else out
            # students read the teachers from teacher_out, whatever their own output folder
            extra = [f"seed={seed}", *args.overrides, *teacher_overrides(teacher_out),
                     f"teacher_label_dir={osp.join(teacher_out, 'teacher_labels')}"]
            if stage.role == "teacher" and (args.shared_teachers or args.teachers):
                extra[0] = f"seed={seeds[0]}"
            records.append(run_stage(stage, root, extra))
        runs[seed] = records
    rows = summarise(runs)
    table = format_summary(rows, seeds, note)
    print("\n" + table)
    with open(osp.join(args.out, "benchmark.md"), "w") as f:
        f.write(table + "\n")
    os.makedirs(args.img, exist_ok=True)
    with open(osp.join(args.img, "toy_benchmark.json"), "w") as f:
        json.dump({"seeds": seeds, "teachers": note or "trained per seed", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
