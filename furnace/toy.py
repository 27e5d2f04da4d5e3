"""The main job on the built-in toy dataset, as a list of stages run through the real experiment folders.

Each stage is `bash exp.voc/<experiment>/script.sh --cfg exp.voc/toy.cfg <overrides>`: training (resumed
if it was interrupted, skipped if finished) then evaluation. This module orders the stages, collects
their results and draws the README's table, plot and prediction grid. Used by tools/quickstart.sh
(through tools/toy_pipeline.py) and tools/toy_benchmark.py.
"""
import importlib.util
import json
import os
import os.path as osp
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from easydict import EasyDict

from furnace.config import REPO_ROOT, collect_overrides, resolve

TOY_CFG = osp.join(REPO_ROOT, "exp.voc", "toy.cfg")
TOY_TEACHERS_CFG = osp.join(REPO_ROOT, "exp.voc", "toy_teachers.cfg")
DEEP_EXP, WIDE_EXP = "voc8.resnet101_deeplabv3plus", "voc8.wresnet50_deeplabv3plus"


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


def main_stages() -> List[Stage]:
    """Teachers (CPS) first, then the ResNet-18 student supervised-only and with MGD."""
    return [
        Stage("WRN-50-2 teacher (CPS)", WIDE_EXP, "cps", role="teacher"),
        Stage("ResNet-101 teacher (CPS)", DEEP_EXP, "cps", role="teacher"),
        Stage("ResNet-18 supervised", "voc8.resnet18_deeplabv3plus", "supervised", ["method=supervised"]),
        Stage("ResNet-18 MGD", "voc8.resnet18_deeplabv3plus", "mgd"),
    ]


def load_experiment_config(experiment: str, overrides: Sequence[str], cfg_files: Sequence[str] = (TOY_CFG,)) -> EasyDict:
    """An experiment folder's config.py with the toy overrides applied, as its train.py would see it."""
    path = osp.join(REPO_ROOT, "exp.voc", experiment, "config.py")
    spec = importlib.util.spec_from_file_location(f"config_{experiment.replace('.', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return resolve(module.C, collect_overrides(cfg_files, overrides, environ={}))


def teacher_overrides(root: str) -> List[str]:
    """teacher_deep= / teacher_wide= overrides naming the CPS teachers a toy run wrote under `root`."""
    return [f"teacher_deep={osp.join(root, DEEP_EXP, 'cps', 'snapshot', 'last.pth')}",
            f"teacher_wide={osp.join(root, WIDE_EXP, 'cps', 'snapshot', 'last.pth')}"]


def stage_overrides(stage: Stage, out_root: str, extra: Sequence[str] = ()) -> List[str]:
    """Where a stage writes, which teachers it reads, plus the run-wide and the stage's own overrides."""
    return [f"output_dir={out_root}/{stage.experiment}/{stage.tag}", *teacher_overrides(out_root),
            *extra, *stage.overrides]


def run_stage(stage: Stage, out_root: str, extra: Sequence[str] = (), nproc: int = 1) -> dict:
    """Train and evaluate one stage (skipping what is already done); its result record."""
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
        cfg_args = [arg for path in stage.cfg_files for arg in ("--cfg", path)]
        subprocess.run(["bash", script, *cfg_args, *overrides], env=env, check=True)
    else:
        print(f"=== {stage.label}: done earlier ({C.output_dir})", flush=True)
    return record(stage, C)


def record(stage: Stage, C: EasyDict) -> dict:
    """One row of the results table."""
    import torch
    from furnace.flops import measure
    evaluated = json.load(open(osp.join(C.output_dir, "eval.json")))[-1]
    ckpt = torch.load(osp.join(C.output_dir, "snapshot", "last.pth"), map_location="cpu", weights_only=False)
    cost = measure(C.network, (512, 512), C.num_classes)
    return {"label": stage.label, "network": C.network, "method": C.method, "role": stage.role,
            "miou": 100 * evaluated["miou"], "iou": [100 * v for v in evaluated["iou"]],
            "backbone_gflops": cost["backbone_flops"] / 1e9, "params_m": cost["model_params"] / 1e6,
            "train_seconds": round(ckpt["train_seconds"], 1), "epochs": ckpt["epoch"],
            "checkpoint": osp.join(C.output_dir, "snapshot", "last.pth"), "experiment": stage.experiment}


def format_table(records: Sequence[dict]) -> str:
    lines = ["| network | method | backbone GFLOPs (512x512) | params (M) | mIoU (%) | train time (s) |",
             "|---|---|--:|--:|--:|--:|"]
    for r in records:
        lines.append(f"| {r['network']} | {r['method']} | {r['backbone_gflops']:.1f} | {r['params_m']:.1f} | "
                     f"{r['miou']:.2f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def plot_miou_vs_flops(records: Sequence[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"cps": "tab:gray", "supervised": "tab:blue", "mgd": "tab:red"}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in records:
        ax.scatter(r["backbone_gflops"], r["miou"], s=60, color=colors.get(r["method"], "k"), zorder=3)
        ax.annotate(r["label"], (r["backbone_gflops"], r["miou"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("backbone GFLOPs at 512x512 (log scale)")
    ax.set_ylabel("toy val mIoU (%)")
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


def run_pipeline(stages: Sequence[Stage], out_root: str, extra: Sequence[str] = (), nproc: int = 1) -> List[dict]:
    return [run_stage(s, out_root, extra, nproc) for s in stages]


def write_report(records: List[dict], img_dir: str, total_seconds: Optional[float] = None,
                 overrides: Sequence[str] = ()) -> str:
    """img/toy_results.json, img/toy_miou_vs_flops.png, img/toy_predictions.png; returns the table."""
    os.makedirs(img_dir, exist_ok=True)
    keys = ("network", "method", "miou", "backbone_gflops", "params_m", "train_seconds", "label", "iou")
    with open(osp.join(img_dir, "toy_results.json"), "w") as f:
        json.dump([{k: r[k] for k in keys} for r in records], f, indent=1)
    plot_miou_vs_flops(records, osp.join(img_dir, "toy_miou_vs_flops.png"))
    order = [r for m in ("supervised", "mgd", "cps") for r in records if r["method"] == m]
    prediction_grid(order, osp.join(img_dir, "toy_predictions.png"), overrides)
    table = format_table(records)
    if total_seconds is not None:
        table += f"\n\nwall time of the whole job: {total_seconds / 60:.1f} min"
    return table
