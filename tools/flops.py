#!/usr/bin/env python
"""Parameters and FLOPs of every network of the project (backbone alone and whole DeepLabv3+), with the
teacher/student ratios, as markdown tables.

  python tools/flops.py [--size 512] [--num_classes 21] [--output_stride 16] [--json flops.json]

Counting: torch.utils.flop_counter.FlopCounterMode, on 'meta' tensors (shapes only: nothing is computed, so
even ResNet-101 at 512x512 takes about a second). Its convention: FLOPs = 2 x multiply-accumulates (MACs) of
convolutions and matrix products; BatchNorm, activations, pooling, additions and bilinear resizing count 0.
Papers usually print MACs under the name "FLOPs", so MACs (= FLOPs / 2) are given too. Input 1x3xSIZExSIZE,
networks exactly as trained (output stride 16, deep stems: docs/method.md, "Networks"), eval mode.
"""
from __future__ import annotations

import argparse
import json
import sys

from furnace.flops import measure

# (preset name, role) of every network in the project
NETWORKS = [("resnet18", "student"), ("mobilenet_v2", "student"),
            ("resnet101", "teacher T_D (deep)"), ("wide_resnet50_2", "teacher T_W (wide)")]
STUDENTS, TEACHERS = ["resnet18", "mobilenet_v2"], ["resnet101", "wide_resnet50_2"]
# the paper's abstract (docs/method.md, "Networks", cost): backbone FLOPs compression of the students
# against the two teachers
PAPER_BACKBONE_RATIOS = {"resnet18": (3.4, 5.3), "mobilenet_v2": (38.7, 59.6)}


def ratios(rows: dict) -> list[dict]:
    """teacher / student ratios of backbone FLOPs, whole-model FLOPs and backbone parameters."""
    out = []
    for s in STUDENTS:
        for t in TEACHERS:
            out.append(dict(teacher=t, student=s,
                            backbone_flops=rows[t]["backbone_flops"] / rows[s]["backbone_flops"],
                            model_flops=rows[t]["model_flops"] / rows[s]["model_flops"],
                            backbone_params=rows[t]["backbone_params"] / rows[s]["backbone_params"]))
    return out


def format_tables(rows: dict, ratio_rows: list[dict]) -> str:
    any_row = next(iter(rows.values()))
    h, w = any_row["size"]
    lines = [f"Input 1x3x{h}x{w}, {any_row['num_classes']} classes, output stride {any_row['output_stride']}. "
             "GFLOPs = 2 x GMACs (conv/matmul only, torch.utils.flop_counter).", "",
             "| network | role | backbone params (M) | backbone GFLOPs | backbone GMACs | "
             "model params (M) | model GFLOPs | model GMACs |", "|---|---|--:|--:|--:|--:|--:|--:|"]
    for name, role in NETWORKS:
        r = rows[name]
        lines.append(f"| {name} | {role} | {r['backbone_params'] / 1e6:.2f} | {r['backbone_flops'] / 1e9:.2f} | "
                     f"{r['backbone_flops'] / 2e9:.2f} | {r['model_params'] / 1e6:.2f} | "
                     f"{r['model_flops'] / 1e9:.2f} | {r['model_flops'] / 2e9:.2f} |")
    lines += ["", "| teacher / student | backbone FLOPs | model FLOPs | backbone params | paper (backbone FLOPs) |",
              "|---|--:|--:|--:|--:|"]
    for r in ratio_rows:
        lo, hi = PAPER_BACKBONE_RATIOS[r["student"]]
        lines.append(f"| {r['teacher']} / {r['student']} | {r['backbone_flops']:.1f}x | {r['model_flops']:.1f}x | "
                     f"{r['backbone_params']:.1f}x | {lo}-{hi}x (range over both teachers) |")
    return "\n".join(lines)


def undilated_mobilenet_note(rows: dict) -> str:
    """The paper's MobileNet-v2 ratios fit a MobileNet-v2 backbone counted at its ImageNet output stride 32."""
    h, w = next(iter(rows.values()))["size"]
    os32 = measure("mobilenet_v2", (h, w), rows["mobilenet_v2"]["num_classes"], 32)["backbone_flops"]
    r = [rows[t]["backbone_flops"] / os32 for t in TEACHERS]
    return (f"Note: mobilenet_v2 backbone undilated (output stride 32): {os32 / 1e9:.2f} GFLOPs -> teacher/student "
            f"{r[0]:.1f}x / {r[1]:.1f}x (paper: 38.7-59.6x).")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs="+", default=[512], help="input side, or H W (default 512)")
    p.add_argument("--num_classes", type=int, default=21)
    p.add_argument("--output_stride", type=int, default=16, choices=[8, 16, 32])
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    if len(args.size) not in (1, 2):
        p.error("--size takes 1 or 2 values")
    size = (args.size[0], args.size[-1])
    rows = {name: measure(name, size, args.num_classes, args.output_stride) for name, _ in NETWORKS}
    result = dict(networks=rows, ratios=ratios(rows))
    print(format_tables(rows, result["ratios"]))
    if args.output_stride == 16:
        print("\n" + undilated_mobilenet_note(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
