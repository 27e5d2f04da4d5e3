"""Draws img/method.png, the README's diagram of one MGD training step (matplotlib only)."""
import os.path as osp

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch


def box(ax, x, y, w, h, text, color, fontsize=9):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor="#333333", linewidth=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, wrap=True)


def arrow(ax, a, b, text="", color="#333333", style="-|>", dashed=False):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=12, color=color,
                                 linestyle="--" if dashed else "-", linewidth=1.2))
    if text:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.12, text, ha="center", fontsize=7.5, color=color)


def main(path: str) -> None:
    fig, ax = plt.subplots(figsize=(11, 5.6), dpi=130)
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 5.6)
    ax.axis("off")
    frozen, student, data, loss = "#dfe7f2", "#fde2c8", "#e8f0dc", "#f6d5d5"
    box(ax, 0.2, 4.3, 1.7, 0.8, "labeled x_l, y_l\n(1/8 of the set)", data)
    box(ax, 0.2, 2.5, 1.7, 1.2, "unlabeled u0, u1\nCutMix boxes m\nu_m = u0(1-m) + u1 m", data)
    box(ax, 3.0, 4.3, 2.1, 0.9, "T_D: deep teacher\nResNet-101 DeepLabv3+\n(CPS-trained, frozen)", frozen, 8)
    box(ax, 3.0, 2.7, 2.1, 0.9, "T_W: wide teacher\nWRN-50-2 DeepLabv3+\n(CPS-trained, frozen)", frozen, 8)
    box(ax, 3.0, 0.6, 2.1, 1.0, "student S\nResNet-18 / MobileNet-v2\nDeepLabv3+ (trained)", student, 8)
    arrow(ax, (1.9, 4.7), (3.0, 4.75), "all inputs")
    arrow(ax, (1.9, 3.1), (3.0, 3.15), "all inputs")
    arrow(ax, (1.05, 2.5), (3.0, 1.1), "x_l, u_m")
    box(ax, 6.6, 4.5, 4.2, 0.8, "image level, semantic-sensitive (vs T_D):\n"
        "lambda_1 * sum |GAP(S(u_m)) - GAP(T_D(u_m))|", loss, 8)
    box(ax, 6.6, 3.2, 4.2, 0.9, "pixel level, consistency (both teachers):\n"
        "CE(S(u_m), argmax mix(T(u0), T(u1), m))\n+ CE(S(x_l), argmax T(x_l))", loss, 8)
    box(ax, 6.6, 2.0, 4.2, 0.8, "region level, content-aware (vs T_W):\n"
        "lambda_2 * MSE(sim7x7(f_S), sim7x7(f_W))", loss, 8)
    box(ax, 6.6, 0.7, 4.2, 0.8, "supervised: CE(S(x_l), y_l)\n(OHEM CE on Cityscapes)", loss, 8)
    arrow(ax, (5.1, 4.8), (6.6, 4.9), "logits", "#2b5797")
    arrow(ax, (5.1, 4.5), (6.6, 3.75), "pseudo-labels", "#2b5797")
    arrow(ax, (5.1, 3.1), (6.6, 3.5), "pseudo-labels", "#2b5797")
    arrow(ax, (5.1, 2.85), (6.6, 2.45), "", "#2b5797")
    ax.text(5.85, 2.35, "decoder\nfeature f_W", ha="center", fontsize=7.5, color="#2b5797")
    for y in (4.75, 3.55, 2.3, 1.1):
        arrow(ax, (5.1, 1.1), (6.6, y), "", "#c0504d", dashed=True)
    ax.text(5.5, 0.25, "gradients flow to the student only; teachers run once per step on all their inputs",
            ha="center", fontsize=8, style="italic", color="#555555")
    ax.text(5.5, 5.45, "One MGD training step", ha="center", fontsize=12, weight="bold")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main(osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), "img", "method.png"))
