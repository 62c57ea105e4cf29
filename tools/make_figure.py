"""Draw the Conv-LoRA figure of the documentation: docs/assets/conv-lora.svg.

Panel (a) is one adapted projection: ``x -> A -> z -> z + MoE(z) -> B``, the conv experts with their
scales, and the gate. Panel (b) is SAM ViT-B's image encoder with an adapter on the ``qkv`` of every layer,
windowed-attention layers and global-attention layers told apart. Deterministic output (fixed hash salt,
no date), so re-running the script changes the file only when the drawing changes.

    python tools/make_figure.py            # writes docs/assets/conv-lora.svg
    python tools/make_figure.py --png X    # also a PNG preview at X
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parents[1] / "docs" / "assets" / "conv-lora.svg"

FROZEN = "#d9d9d9"
TRAINED = "#9fd8cf"
EXPERT = "#f7c58b"
GATE = "#c9b3e6"
WINDOW = "#dbe9f6"
GLOBAL = "#5b8fc7"
INK = "#222222"
MUTED = "#666666"


def box(ax, x, y, w, h, text, color, size=9, weight="normal", style="round,pad=0.02,rounding_size=0.8", ec=INK):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=color, ec=ec, lw=0.9))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, color=INK, weight=weight)


def arrow(ax, start, end, color=INK, style="-|>", lw=1.0, rad=0.0, dashed=False):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=9,
            color=color,
            lw=lw,
            linestyle=(0, (3, 2)) if dashed else "-",
            connectionstyle=f"arc3,rad={rad}",
            shrinkA=0,
            shrinkB=0,
        )
    )


def plus(ax, x, y, r=1.3):
    ax.add_patch(Circle((x, y), r, fc="white", ec=INK, lw=0.9))
    ax.text(x, y - 0.05, "+", ha="center", va="center", fontsize=11, color=INK)


def layer_panel(ax) -> None:
    ax.set_xlim(-0.5, 101.5)
    ax.set_ylim(0, 50)
    ax.axis("off")
    title = "(a)  One adapted projection: SAM's fused qkv, y = W x + b + (α/r) · B(z + MoE(z)),  z = A(dropout(x))"
    ax.text(0, 49.5, title, fontsize=10.5, weight="bold", va="top", color=INK)

    # main path
    box(ax, 1, 38, 11, 7, "x\n(b, h, w, d)", "white")
    box(ax, 30, 38, 24, 7, "W x + b   (frozen)\nqkv Linear, d → 3d", FROZEN)
    plus(ax, 86, 41.5)
    box(ax, 90.5, 38, 9.5, 7, "y\n(b, h, w, 3d)", "white")
    arrow(ax, (12, 41.5), (30, 41.5))
    arrow(ax, (54, 41.5), (84.7, 41.5))
    arrow(ax, (87.3, 41.5), (90.5, 41.5))

    # low-rank path
    box(ax, 14, 25, 10, 6, "dropout", "white")
    box(ax, 27, 25, 10, 6, "A\nd → r", TRAINED)
    ax.text(42.5, 31.8, "z  (b, h, w, r)", ha="center", fontsize=8.5, color=MUTED)
    plus(ax, 62, 28)
    box(ax, 66, 25, 10, 6, "B\nr → 3d\n(starts at 0)", TRAINED, size=8.5)
    box(ax, 79, 25, 8, 6, "× α/r", "white")
    arrow(ax, (6.5, 38), (6.5, 28), style="-")
    arrow(ax, (6.5, 28), (14, 28))
    arrow(ax, (24, 28), (27, 28))
    arrow(ax, (37, 28), (60.7, 28))
    ax.text(52, 28.8, "skip: z", fontsize=8, color=MUTED, ha="center")
    arrow(ax, (63.3, 28), (66, 28))
    arrow(ax, (76, 28), (79, 28))
    arrow(ax, (86, 31), (86, 40.2))

    # the mixture of experts
    ax.add_patch(FancyBboxPatch((14, 0.5), 56, 20.5, boxstyle="round,pad=0.02,rounding_size=1.2",
                                fc="#fbfaf6", ec=MUTED, lw=0.8, linestyle=(0, (4, 2))))  # fmt: skip
    ax.text(15.2, 19.6, "MoE(z): mixture of multi-scale conv experts", fontsize=9, weight="bold", va="top")
    arrow(ax, (42, 28), (42, 21))
    arrow(ax, (62, 21), (62, 26.7))
    ax.text(61.2, 23.3, "MoE(z)", fontsize=8, color=MUTED, ha="right")

    # gate
    box(ax, 16, 11.5, 15, 5.5, "mean over h, w\nz̄  (b, r)", GATE, size=8)
    box(ax, 16, 3.6, 15, 6.4, "logits = z̄ W_gate\n+ learned noise (training)\nkeep top-1", GATE, size=8)
    arrow(ax, (23.5, 11.5), (23.5, 10))
    arrow(ax, (31, 6), (36, 6))
    ax.text(33.5, 6.8, "route", fontsize=7.5, color=MUTED, ha="center")
    ax.text(23.5, 2.2, "aux loss (× 0.01) → moe_aux_loss(model)", fontsize=7, color=MUTED, ha="center", va="center")

    # experts
    experts = [("expert 1", "× 1"), ("expert 2", "× 2"), ("expert 8", "× 8")]
    xs = [36.5, 47, 59]
    for (name, scale), x in zip(experts, xs, strict=True):
        box(ax, x, 2.5, 10, 14.5, "", EXPERT)
        ax.text(x + 5, 15.6, f"{name}\nscale {scale}", ha="center", va="top", fontsize=8, weight="bold")
        ax.text(x + 5, 7.6, "resize × s\nconv 3×3, r → r\nGELU\nresize back", ha="center", va="center", fontsize=7)
    ax.text(57.8, 9.8, "…", fontsize=14, ha="center", va="center")
    legend = "trained: A, B, the experts, the gate\nfrozen: W and its bias b\ndefaults: r = 3, α = 32, 8 experts"
    ax.text(86, 10, legend, fontsize=8, color=MUTED, ha="center", va="center", linespacing=1.6)
    ax.text(63, 21.6, "chosen expert, unweighted\n(weighted_combine=False)", fontsize=7, color=MUTED, va="bottom")


def encoder_panel(ax) -> None:
    ax.set_xlim(-0.5, 101.5)
    ax.set_ylim(0, 30)
    ax.axis("off")
    ax.text(0, 29.5, "(b)  Where the adapters sit: SAM ViT-B's image encoder, one adapter on the qkv of every layer",
            fontsize=10.5, weight="bold", va="top", color=INK)  # fmt: skip
    box(ax, 0, 13, 8.5, 8, "image\n1024²", "white", size=8.5)
    box(ax, 10.5, 13, 8.5, 8, "patch\nembed 16\n(frozen)", FROZEN, size=8)
    arrow(ax, (8.5, 17), (10.5, 17))
    globals_ = {2, 5, 8, 11}
    x0, width, gap = 21, 4.3, 0.6
    for index in range(12):
        x = x0 + index * (width + gap)
        is_global = index in globals_
        box(ax, x, 13, width, 8, str(index), GLOBAL if is_global else WINDOW, size=8, weight="bold")
        ax.add_patch(FancyBboxPatch((x + 0.9, 13.8), width - 1.8, 1.8, boxstyle="round,pad=0.01,rounding_size=0.3",
                                    fc=EXPERT, ec=INK, lw=0.5))  # fmt: skip
    end = x0 + 12 * (width + gap) - gap
    arrow(ax, (19, 17), (x0, 17))
    box(ax, end + 2, 13, 7.5, 8, "neck\n(frozen)", FROZEN, size=8)
    arrow(ax, (end, 17), (end + 2, 17))
    box(ax, end + 11.5, 13, 9.5, 8, "mask\ndecoder\n(trained)", TRAINED, size=8)
    arrow(ax, (end + 9.5, 17), (end + 11.5, 17))
    ax.text(end + 16.2, 11.8, "no prompts\n→ masks 256²", fontsize=7.5, ha="center", va="top", color=MUTED)

    # legend
    box(ax, 21, 3.5, 3, 2.5, "", WINDOW, size=7)
    ax.text(24.8, 4.75, "windowed attention: qkv sees (b·25, 14, 14, d); the gate picks an expert per 14×14 window",
            fontsize=7.8, va="center")  # fmt: skip
    box(ax, 21, 0, 3, 2.5, "", GLOBAL, size=7)
    ax.text(24.8, 1.25, "global attention (layers 2, 5, 8, 11): qkv sees (b, 64, 64, d); one choice per image",
            fontsize=7.8, va="center")  # fmt: skip
    ax.add_patch(FancyBboxPatch((0.6, 7.4), 3, 1.4, boxstyle="round,pad=0.01,rounding_size=0.3", fc=EXPERT, ec=INK,
                                lw=0.5))  # fmt: skip
    ax.text(4.3, 8.1, "Conv-LoRA on qkv", fontsize=7.8, va="center")
    ax.add_patch(FancyBboxPatch((0.6, 4.4), 3, 1.4, boxstyle="round,pad=0.01,rounding_size=0.3", fc=TRAINED, ec=INK,
                                lw=0.5))  # fmt: skip
    ax.text(4.3, 5.1, "trained", fontsize=7.8, va="center")
    ax.add_patch(FancyBboxPatch((0.6, 1.4), 3, 1.4, boxstyle="round,pad=0.01,rounding_size=0.3", fc=FROZEN, ec=INK,
                                lw=0.5))  # fmt: skip
    ax.text(4.3, 2.1, "frozen", fontsize=7.8, va="center")


def draw() -> plt.Figure:
    plt.rcParams.update({"svg.hashsalt": "convlora", "svg.fonttype": "none", "font.family": "DejaVu Sans"})
    figure = plt.figure(figsize=(11, 7.8))
    top = figure.add_axes((0.01, 0.33, 0.98, 0.66))
    bottom = figure.add_axes((0.01, 0.01, 0.98, 0.31))
    layer_panel(top)
    encoder_panel(bottom)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", default=None, help="also write a PNG preview here")
    args = parser.parse_args()
    figure = draw()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(OUT, format="svg", metadata={"Date": None})
    if args.png:
        figure.savefig(args.png, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
