"""The main job on the built-in toy dataset: CPS teachers (trained once), then the ResNet-18 student with MGD
and supervised-only over several seeds, evaluation of all, and the results table, plot and prediction grid.

    python tools/toy_pipeline.py [--seeds 3] [--out runs/toy] [--img img] [key=value ...]

Each stage is `bash exp.voc/<experiment>/script.sh --cfg exp.voc/toy.cfg <overrides>`: training (resumed if
it was interrupted, skipped if finished) then evaluation, through the real experiment folders. A student's
mIoU on the toy set moves by several points with its seed (and with the machine's floating-point order), so
each student is reported as the mean and standard deviation over its seeds, read back from the runs'
eval.json files (tools/collect_results.py); the line under the table says whether the MGD-supervised gap
exceeds three times the larger spread. Interrupt the job at any point and run it again: finished stages are
skipped, an interrupted one resumes. tools/toy_benchmark.py reuses these stages.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # the sibling tool collect_results
sys.path.insert(1, osp.dirname(osp.dirname(osp.abspath(__file__))))  # furnace, from a checkout

from easydict import EasyDict  # noqa: E402

import collect_results  # noqa: E402
from furnace.config import REPO_ROOT, collect_overrides, load_experiment, resolve  # noqa: E402
from furnace.run import check_folder  # noqa: E402

TOY_CFG = osp.join(REPO_ROOT, "exp.voc", "toy.cfg")
TOY_TEACHERS_CFG = osp.join(REPO_ROOT, "exp.voc", "toy_teachers.cfg")
DEEP_EXP, WIDE_EXP = "voc8.resnet101_deeplabv3plus", "voc8.wresnet50_deeplabv3plus"
R18 = "voc8.resnet18_deeplabv3plus"
DEFAULT_SEEDS = 3


@dataclass
class Stage:
    label: str                      # e.g. "ResNet-18 MGD"
    experiment: str                 # folder under exp.voc/
    tag: str                        # output subfolder: <out_root>/<experiment>/<tag>
    overrides: List[str] = field(default_factory=list)
    role: str = "student"           # 'teacher' or 'student'

    @property
    def cfg_files(self) -> List[str]:
        """The toy overrides; teachers add their longer schedule."""
        return [TOY_CFG, TOY_TEACHERS_CFG] if self.role == "teacher" else [TOY_CFG]


def teacher_stages(epochs: Optional[int] = None) -> List[Stage]:
    """The two CPS teachers; `epochs` replaces toy_teachers.cfg's schedule (20 steps per epoch)."""
    extra = [] if epochs is None else [f"epochs={epochs}"]
    return [Stage("WRN-50-2 teacher (CPS)", WIDE_EXP, "cps", list(extra), role="teacher"),
            Stage("ResNet-101 teacher (CPS)", DEEP_EXP, "cps", list(extra), role="teacher")]


def student_stages(seed: Optional[int] = None) -> List[Stage]:
    """The ResNet-18 student supervised-only and with MGD; with a seed, their run of that seed."""
    suffix, extra = ("", []) if seed is None else (f"-seed{seed}", [f"seed={seed}"])
    return [Stage("ResNet-18 supervised", R18, "supervised" + suffix, ["method=supervised", *extra]),
            Stage("ResNet-18 MGD", R18, "mgd" + suffix, extra)]


def main_stages(seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)), teacher_epochs: Optional[int] = None
                ) -> List[Stage]:
    """Teachers (CPS) first, then the two students for every seed."""
    return [*teacher_stages(teacher_epochs), *(s for seed in seeds for s in student_stages(seed))]


def load_experiment_config(experiment: str, overrides: Sequence[str], cfg_files: Sequence[str] = (TOY_CFG,)) -> EasyDict:
    """An experiment folder's config.py with the toy overrides applied, as its train.py would see it."""
    C = load_experiment(osp.join(REPO_ROOT, "exp.voc", experiment))
    return resolve(C, collect_overrides(cfg_files, overrides))


def teacher_overrides(root: str) -> List[str]:
    """teacher_deep= / teacher_wide= overrides naming the CPS teachers a toy run wrote under `root`."""
    return [f"teacher_deep={osp.join(root, DEEP_EXP, 'cps', 'snapshot', 'last.pth')}",
            f"teacher_wide={osp.join(root, WIDE_EXP, 'cps', 'snapshot', 'last.pth')}"]


def stage_overrides(stage: Stage, out_root: str, extra: Sequence[str] = ()) -> List[str]:
    """Where a stage writes, which teachers it reads, plus the run-wide and the stage's own overrides."""
    out_root = osp.abspath(out_root)  # script.sh runs in the experiment folder
    return [f"output_dir={out_root}/{stage.experiment}/{stage.tag}", *teacher_overrides(out_root),
            *extra, *stage.overrides]


def run_stage(stage: Stage, out_root: str, extra: Sequence[str] = (), nproc: int = 1, threads: Optional[int] = None,
              log: Optional[str] = None) -> dict:
    """Train and evaluate one stage (skipping what is already done); its result record, read from its run
    folder's eval.json and run.json. `threads` sets the stage's OMP_NUM_THREADS (torch's thread count);
    `log` sends its output to that file instead of the terminal."""
    overrides = stage_overrides(stage, out_root, extra)
    C = load_experiment_config(stage.experiment, overrides, stage.cfg_files)
    last = osp.join(C.output_dir, "snapshot", "last.pth")
    results = osp.join(C.output_dir, "eval.json")
    done = osp.isfile(results) and osp.isfile(last) and osp.getmtime(results) > osp.getmtime(last)
    if not done:
        print(f"\n=== {stage.label}: {stage.experiment} -> {C.output_dir}", flush=True)
        script = osp.join(REPO_ROOT, "exp.voc", stage.experiment, "script.sh")
        env = dict(os.environ, NGPUS=str(nproc))
        env.pop("EVAL_EPOCHS", None)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        cfg_args = [arg for path in stage.cfg_files for arg in ("--cfg", path)]
        command = ["bash", script, *cfg_args, *overrides]
        if log is None:
            subprocess.run(command, env=env, check=True)
        else:
            os.makedirs(osp.dirname(log), exist_ok=True)
            with open(log, "w") as f:
                done_run = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT)
            if done_run.returncode:
                with open(log) as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"{stage.label} failed (exit {done_run.returncode}); its log {log} ends:\n{tail}")
    else:
        print(f"=== {stage.label}: done earlier ({C.output_dir})", flush=True)
    return record(stage, C)


def record(stage: Stage, C: EasyDict) -> dict:
    """One run's result: collect_results' record of its folder, with the stage's label and role."""
    run = collect_results.read_run(C.output_dir)
    return {**run, "label": stage.label, "role": stage.role, "network": C.network, "method": C.method,
            "seed": C.seed, "miou": run["miou_last"], **collect_results.network_cost(C.network, C.num_classes),
            "experiment": stage.experiment,
            "checkpoint": osp.join(C.output_dir, "snapshot", "last.pth")}


def summarise(records: Sequence[dict]) -> List[dict]:
    """One row per stage label (the seeds of a student together): mean and standard deviation of mIoU over the
    seeds (collect_results.group_seeds), with the label, role and parameter count."""
    rows = collect_results.group_seeds(records)
    by_folder = {r["folder"]: r for r in records}
    for row in rows:
        first = by_folder[row["folders"][0]]
        row.update(label=first["label"], role=first["role"], params_m=first["params_m"])
    return rows


def verdict(rows: Sequence[dict]) -> str:
    """Whether the MGD student's lead over the supervised one exceeds three times the larger of their spreads,
    and whether each teacher's lead over each student exceeds three times that student's spread (a teacher is
    trained once: its own spread is not measured)."""
    by_method = {r["method"]: r for r in rows if r["role"] == "student"}
    if not {"mgd", "supervised"} <= set(by_method):
        return ""
    mgd, sup = by_method["mgd"], by_method["supervised"]
    gap = mgd["miou_last_mean"] - sup["miou_last_mean"]
    spread = max(mgd["miou_last_std"], sup["miou_last_std"])
    if min(mgd["n"], sup["n"]) < 2:
        return f"MGD - supervised: {gap:+.2f} mIoU from a single seed: not a result (run --seeds 3)."
    decided = abs(gap) > 3 * spread
    lines = [f"MGD - supervised: {gap:+.2f} mIoU over {min(mgd['n'], sup['n'])} seeds; larger spread (std) "
             f"{spread:.2f}: {'more' if decided else 'less'} than 3 x the spread, "
             f"{'a difference' if decided else 'no difference'}."]
    for teacher in (r for r in rows if r["role"] == "teacher"):
        parts = []
        for student in (mgd, sup):
            lead = teacher["miou_last_mean"] - student["miou_last_mean"]
            ahead = lead > 3 * student["miou_last_std"]
            parts.append(f"{lead:+.2f} over {student['method']} ({'more' if ahead else 'less'} than 3 x its spread "
                         f"{student['miou_last_std']:.2f})")
        lines.append(f"{teacher['label']}: " + ", ".join(parts) + ".")
    return "\n".join(lines)


def format_table(rows: Sequence[dict]) -> str:
    lines = ["| network | method | seeds | mIoU (%) mean ± std | per seed | backbone GFLOPs (512x512) | params (M) "
             "| train time (s) |", "|---|---|--:|--:|---|--:|--:|--:|"]
    for r in rows:
        per_seed = ", ".join(f"{v:.1f}" for v in r["miou_last"]) if r["n"] > 1 else ""
        spread = f" ± {r['miou_last_std']:.2f}" if r["n"] > 1 else ""
        lines.append(f"| {r['network']} | {r['method']} | {r['n']} | {r['miou_last_mean']:.2f}{spread} | {per_seed} "
                     f"| {r['backbone_gflops']:.1f} | {r['params_m']:.1f} | {r['train_seconds_mean']:.0f} |")
    return "\n".join(lines)


def plot_miou_vs_flops(rows: Sequence[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"cps": "tab:gray", "supervised": "tab:blue", "mgd": "tab:red"}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        color = colors.get(r["method"], "k")
        ax.errorbar(r["backbone_gflops"], r["miou_last_mean"], yerr=r["miou_last_std"], fmt="o", ms=7,
                    color=color, capsize=4, zorder=3)
        if r["n"] > 1:  # each seed, beside the mean
            ax.scatter([r["backbone_gflops"] * 1.06] * r["n"], r["miou_last"], s=10, color=color, alpha=0.5)
        ax.annotate(r["label"] + (f" ({r['n']} seeds)" if r["n"] > 1 else ""),
                    (r["backbone_gflops"], r["miou_last_mean"]), textcoords="offset points", xytext=(8, 4),
                    fontsize=8)
    ax.set_xscale("log")
    flops = [r["backbone_gflops"] for r in rows]
    ax.set_xlim(min(flops) / 1.3, max(flops) * 2.2)  # room for the labels right of the points
    ax.set_xlabel("backbone GFLOPs at 512x512 (log scale)")
    ax.set_ylabel("toy val mIoU (%): mean ± std over seeds")
    ax.set_title("Toy dataset, 1/8 labeled: mIoU against backbone cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def prediction_grid(records: Sequence[dict], path: str, overrides: Sequence[str] = (), n_images: int = 4) -> None:
    """Rows of val images: image, ground truth, then each record's prediction (VOC colours)."""
    import cv2
    import numpy as np
    import torch
    from furnace.checkpoint import load_segmentor
    from furnace.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset
    from furnace.evaluate import inference_options, predict_probs
    from furnace.visualize import colorize, get_palette

    C = load_experiment_config(records[-1]["experiment"], overrides)
    dataset = build_dataset(C, "val")
    palette = get_palette("voc")
    models = [load_segmentor(r["checkpoint"]).eval() for r in records]
    options = inference_options(C)
    cell_w, cell_h, rows = 128, 96, []
    for i in np.linspace(0, len(dataset) - 1, n_images).astype(int):
        sample = dataset[int(i)]
        image = sample["image"].permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
        cells = [np.clip(image * 255, 0, 255).astype(np.uint8), colorize(sample["label"].numpy(), palette)]
        with torch.no_grad():
            for model in models:
                cells.append(colorize(predict_probs(model, sample["image"][None], **options).argmax(1)[0].numpy(),
                                      palette))
        cells = [cv2.resize(c, (cell_w, cell_h), interpolation=cv2.INTER_NEAREST) for c in cells]
        rows.append(np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in cells], 1))
    grid = np.concatenate(rows, 0)
    header = np.full((22, grid.shape[1], 3), 255, np.uint8)
    titles = ["image", "ground truth"] + [r["label"] for r in records]
    step = grid.shape[1] / len(titles)
    for k, t in enumerate(titles):
        cv2.putText(header, t[:22], (int(k * step) + 3, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(path, np.concatenate([header, grid], 0)[:, :, ::-1])


def check_stages(stages: Sequence[Stage], out_root: str, extra: Sequence[str] = ()) -> None:
    """Before any work: refuse (furnace.run.RunRefused, naming the keys) a stage whose folder under `out_root`
    holds a run of other settings, e.g. teachers of another --teacher-epochs, which would otherwise count as
    done and be reported as these settings' result."""
    for stage in stages:
        check_folder(load_experiment_config(stage.experiment, stage_overrides(stage, out_root, extra),
                                            stage.cfg_files), "this toy pipeline stage")


def default_teacher_jobs() -> int:
    """How many teachers train at once: both on a CPU with at least two cores, one at a time on a GPU.
    Two one-thread processes keep two cores busier than one two-thread process does at the toy's small
    tensors (README, "The quickstart, from a fresh clone")."""
    import torch
    return 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))


def run_pipeline(stages: Sequence[Stage], out_root: str, extra: Sequence[str] = (), nproc: int = 1,
                 teacher_jobs: int = 1) -> List[dict]:
    """Every stage in order, except that with teacher_jobs > 1 the teachers (which depend on nothing) train
    side by side first, each process with cpu_count // (teacher_jobs x nproc) threads and its output in
    <out_root>/logs/<experiment>-<tag>.log. The students then run one by one with torch's default threads."""
    check_stages(stages, out_root, extra)
    teachers = [s for s in stages if s.role == "teacher"]
    records = {}
    if teacher_jobs > 1 and len(teachers) > 1:
        from concurrent.futures import ThreadPoolExecutor
        threads = max(1, (os.cpu_count() or 1) // (teacher_jobs * nproc))
        logs = {s.label: osp.join(osp.abspath(out_root), "logs", f"{s.experiment}-{s.tag}.log") for s in teachers}
        print(f"=== {len(teachers)} teachers side by side, {teacher_jobs} at a time, {threads} thread(s) each: "
              + ", ".join(logs.values()), flush=True)
        with ThreadPoolExecutor(teacher_jobs) as pool:
            futures = {s.label: pool.submit(run_stage, s, out_root, extra, nproc, threads, logs[s.label])
                       for s in teachers}
            records = {label: future.result() for label, future in futures.items()}
    return [records[s.label] if s.label in records else run_stage(s, out_root, extra, nproc) for s in stages]


def write_report(records: List[dict], img_dir: str, total_seconds: Optional[float] = None,
                 overrides: Sequence[str] = ()) -> str:
    """img/toy_results.json (the summary rows and every run), img/toy_miou_vs_flops.png,
    img/toy_predictions.png (the first seed's students); returns the table and its verdict."""
    os.makedirs(img_dir, exist_ok=True)
    rows = summarise(records)
    keys = ("label", "role", "network", "method", "n", "seeds", "miou_last_mean", "miou_last_std", "miou_last",
            "backbone_gflops", "params_m", "train_seconds_mean", "folders")
    runs = [{k: r[k] for k in ("label", "network", "method", "seed", "miou", "iou_last", "train_seconds", "folder")}
            for r in records]
    with open(osp.join(img_dir, "toy_results.json"), "w") as f:
        json.dump({"rows": [{k: r[k] for k in keys} for r in rows], "runs": runs}, f, indent=1)
    plot_miou_vs_flops(rows, osp.join(img_dir, "toy_miou_vs_flops.png"))
    first_seed = {}
    for r in records:
        first_seed.setdefault(r["label"], r)
    order = [r for m in ("supervised", "mgd", "cps") for r in first_seed.values() if r["method"] == m]
    prediction_grid(order, osp.join(img_dir, "toy_predictions.png"), overrides)
    table = format_table(rows)
    line = verdict(rows)
    if line:
        table += "\n\n" + line
    if total_seconds is not None:
        table += f"\n\nwall time of the whole job: {total_seconds / 60:.1f} min"
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="student seeds 0 .. N-1 (teachers: once)")
    parser.add_argument("--out", default=osp.join(REPO_ROOT, "runs", "toy"), help="where the stages write")
    parser.add_argument("--img", default=osp.join(REPO_ROOT, "img"), help="where the table and figures go")
    parser.add_argument("--nproc", type=int, default=1, help="processes per stage (torchrun)")
    parser.add_argument("--teacher-epochs", type=int,
                        help="the teachers' epochs of 20 steps (default: toy_teachers.cfg's 10; 5 halves their time and "
                             "leaves them too close to the MGD student to tell apart: README, 'How much of it is "
                             "noise'); use a new --out, a finished teacher of another schedule is refused")
    parser.add_argument("--teacher-jobs", type=int,
                        help="teachers trained at once (default: 2 on a CPU with 2+ cores, 1 on a GPU)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every stage")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: need at least one")
    if any(o.split("=", 1)[0].strip() == "seed" for o in args.overrides):
        parser.error("seed=: the students' seeds are --seeds (0 .. N-1); the teachers keep the config's seed")
    if args.teacher_epochs is not None and args.teacher_epochs < 1:
        parser.error(f"--teacher-epochs {args.teacher_epochs}: need at least one")
    if args.teacher_jobs is not None and args.teacher_jobs < 1:
        parser.error(f"--teacher-jobs {args.teacher_jobs}: need at least one")
    teacher_jobs = default_teacher_jobs() if args.teacher_jobs is None else args.teacher_jobs
    start = time.time()
    records = run_pipeline(main_stages(range(args.seeds), args.teacher_epochs), args.out, args.overrides, args.nproc,
                           teacher_jobs)
    table = write_report(records, args.img, time.time() - start, args.overrides)
    print("\n" + table)
    with open(osp.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
