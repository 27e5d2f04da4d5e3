"""One results table for every evaluated run under a folder.

    python tools/collect_results.py ROOT [--out DIR] [--per-run]

A run is a folder holding `eval.json` (written by every experiment's eval.py) and its checkpoints. Its
settings come from `run.json` (or, for an older run, the config saved in its last checkpoint). Runs whose
settings differ only in `seed` form one row: mIoU as the mean and standard deviation over the seeds, with
each seed's value; `--per-run` lists every run on its own instead. Columns: dataset, partition (1/N
labeled), network, method, setting (published / fast; '*' when one of the setting's keys was changed),
seeds, mIoU of the last checkpoint and the best evaluated one, epochs, train time, backbone GFLOPs at
512x512, and the run folder(s). Writes DIR/results.md and DIR/results.csv (DIR defaults to ROOT), and
DIR/miou_vs_labeled.png when a network and method were run at several partitions.

The "last" column is what the run reports; "best" is the best of the checkpoints that were evaluated
(eval.py -e 20- evaluates a range, as the paper's protocol picks checkpoints post hoc).
"""
import argparse
import csv
import glob
import json
import os
import os.path as osp
import statistics
import sys
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make furnace importable from a checkout
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from furnace.config import SETTINGS  # noqa: E402

EVAL_FILE = "eval.json"


class ResultsError(RuntimeError):
    """A run folder whose results cannot be read."""


def _last_evaluation(evaluations: List[dict], path: str) -> dict:
    """The entry of last.pth, else of the highest epoch evaluated."""
    if not evaluations:
        raise ResultsError(f"{path}: no evaluation in it")
    for entry in evaluations:
        if osp.basename(str(entry.get("checkpoint", ""))) == "last.pth":
            return entry
    return max(evaluations, key=lambda e: e.get("epoch") or -1)


def _checkpoint_facts(folder: str) -> Dict[str, Optional[float]]:
    """Epochs trained and train time, from the run's last checkpoint (memory-mapped: teachers' files are large)."""
    import torch
    path = osp.join(folder, "snapshot", "last.pth")
    if not osp.isfile(path):
        return {"epochs": None, "train_seconds": None}
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return {"epochs": ckpt.get("epoch"), "train_seconds": ckpt.get("train_seconds")}


def setting_label(identity: dict) -> str:
    """The run's setting, with '*' when one of that setting's keys was set to another value."""
    name = identity.get("setting")
    preset = SETTINGS.get(name)
    if preset is None:
        return str(name)
    changed = [k for k, v in preset.items() if k in identity and identity[k] != v and k != "amp"]
    return name + ("*" if changed else "")


@lru_cache(maxsize=None)
def network_cost(network: str, num_classes: int) -> dict:
    """GFLOPs of the backbone on a 512 x 512 image and millions of parameters of the whole network (counted
    once per network and class count)."""
    from furnace.flops import measure
    cost = measure(network, (512, 512), num_classes)
    return {"backbone_gflops": cost["backbone_flops"] / 1e9, "params_m": cost["model_params"] / 1e6}


def read_run(folder: str) -> dict:
    """One run's record: its identity (settings), last and best evaluated mIoU (%), epochs, train time."""
    from furnace.run import recorded_identity
    path = osp.join(folder, EVAL_FILE)
    try:
        with open(path) as f:
            evaluations = json.load(f)
    except (OSError, ValueError) as e:
        raise ResultsError(f"{path}: not readable as the JSON eval.py writes: {e}") from None
    identity, _, _ = recorded_identity(folder)
    if identity is None:
        raise ResultsError(f"{folder}: has {EVAL_FILE} but neither run.json nor a checkpoint with its config")
    last = _last_evaluation(evaluations, path)
    return {"folder": folder, "identity": identity, "miou_last": 100 * last["miou"],
            "miou_best": 100 * max(e["miou"] for e in evaluations), "iou_last": [100 * v for v in last["iou"]],
            **_checkpoint_facts(folder)}


def find_runs(root: str) -> List[dict]:
    """Every run under root (a folder with eval.json), in path order."""
    if not osp.isdir(root):
        raise ResultsError(f"results root not found: {root}")
    paths = sorted(glob.glob(osp.join(root, "**", EVAL_FILE), recursive=True))
    return [read_run(osp.dirname(p)) for p in paths]


def _spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def group_seeds(runs: Sequence[dict], root: str = "", per_run: bool = False) -> List[dict]:
    """Table rows: runs whose identities differ only in `seed` are one row (unless per_run), in order of first
    appearance; mIoU mean and (sample) standard deviation over the seeds."""
    groups: Dict[str, List[dict]] = {}
    for r in runs:
        key = r["folder"] if per_run else json.dumps({k: v for k, v in r["identity"].items() if k != "seed"},
                                                     sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    rows = []
    for members in groups.values():
        members = sorted(members, key=lambda m: m["identity"].get("seed", 0))
        ident = members[0]["identity"]
        last = [m["miou_last"] for m in members]
        best = [m["miou_best"] for m in members]
        times = [m["train_seconds"] for m in members if m["train_seconds"] is not None]
        epochs = {m["epochs"] for m in members}
        rows.append({
            "dataset": ident.get("dataset"), "partition": ident.get("partition"), "network": ident.get("network"),
            "method": ident.get("method"), "setting": setting_label(ident),
            "seeds": [m["identity"].get("seed") for m in members], "n": len(members),
            "miou_last_mean": statistics.mean(last), "miou_last_std": _spread(last), "miou_last": last,
            "miou_best_mean": statistics.mean(best), "miou_best_std": _spread(best),
            "epochs": epochs.pop() if len(epochs) == 1 else None,
            "train_seconds_mean": statistics.mean(times) if times else None,
            "backbone_gflops": network_cost(ident["network"], int(ident["num_classes"]))["backbone_gflops"],
            "folders": [osp.relpath(m["folder"], root) if root else m["folder"] for m in members]})
    return rows


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def format_markdown(rows: Sequence[dict]) -> str:
    lines = ["| dataset | labeled | network | method | setting | seeds | mIoU last | per seed | mIoU best | epochs "
             "| train time (min) | backbone GFLOPs | run |",
             "|---|---|---|---|---|--:|--:|---|--:|--:|--:|--:|---|"]
    for r in rows:
        per_seed = ", ".join(f"{v:.1f}" for v in r["miou_last"]) if r["n"] > 1 else ""
        minutes = f"{r['train_seconds_mean'] / 60:.1f}" if r["train_seconds_mean"] is not None else ""
        run = r["folders"][0] + (f" (+{r['n'] - 1})" if r["n"] > 1 else "")
        lines.append(f"| {r['dataset']} | 1/{r['partition']} | {r['network']} | {r['method']} | {r['setting']} "
                     f"| {r['n']} | {_pm(r['miou_last_mean'], r['miou_last_std'], r['n'])} | {per_seed} "
                     f"| {_pm(r['miou_best_mean'], r['miou_best_std'], r['n'])} | {r['epochs'] if r['epochs'] is not None else ''} "
                     f"| {minutes} | {r['backbone_gflops']:.1f} | {run} |")
    return "\n".join(lines)


CSV_COLUMNS = ("dataset", "partition", "network", "method", "setting", "n", "seeds", "miou_last_mean",
               "miou_last_std", "miou_last", "miou_best_mean", "miou_best_std", "epochs", "train_seconds_mean",
               "backbone_gflops", "folders")


def write_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([" ".join(map(str, r[c])) if isinstance(r[c], list) else r[c] for c in CSV_COLUMNS])


def plot_miou_vs_labeled(rows: Sequence[dict], path: str) -> bool:
    """mIoU against the labeled fraction, one line per (dataset, network, method, setting) run at two or more
    partitions, with the spread over seeds as error bars. False (and no file) if there is no such line."""
    lines: Dict[tuple, List[dict]] = {}
    for r in rows:
        lines.setdefault((r["dataset"], r["network"], r["method"], r["setting"]), []).append(r)
    lines = {k: v for k, v in lines.items() if len({r["partition"] for r in v}) > 1}
    if not lines:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (dataset, network, method, setting), members in lines.items():
        members = sorted(members, key=lambda r: -r["partition"])
        ax.errorbar([1 / r["partition"] for r in members], [r["miou_last_mean"] for r in members],
                    yerr=[r["miou_last_std"] for r in members], marker="o", capsize=3,
                    label=f"{dataset} {network} {method} ({setting})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labeled fraction")
    ax.set_ylabel("mIoU (%), last checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def collect(root: str, out_dir: Optional[str] = None, per_run: bool = False) -> List[dict]:
    """Read every run under root, write results.md / results.csv (and the plot) to out_dir; the rows."""
    out_dir = out_dir or root
    rows = group_seeds(find_runs(root), root, per_run)
    os.makedirs(out_dir, exist_ok=True)
    with open(osp.join(out_dir, "results.md"), "w") as f:
        f.write(format_markdown(rows) + "\n")
    write_csv(rows, osp.join(out_dir, "results.csv"))
    plot_miou_vs_labeled(rows, osp.join(out_dir, "miou_vs_labeled.png"))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder searched for run folders (any depth), e.g. exp.voc or runs/toy")
    parser.add_argument("--out", help="where results.md, results.csv and the plot go (default: ROOT)")
    parser.add_argument("--per-run", action="store_true", help="one row per run instead of one per seed group")
    args = parser.parse_args(argv)
    try:
        rows = collect(osp.abspath(args.root), args.out, args.per_run)
    except ResultsError as e:
        parser.exit(2, f"collect_results.py: {e}\n")
    if not rows:
        parser.exit(1, f"collect_results.py: no evaluated run (no {EVAL_FILE}) under {args.root}\n")
    print(format_markdown(rows))


if __name__ == "__main__":
    main()
