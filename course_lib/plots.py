"""Figure helpers. ``savefig(name)`` writes into the figures folder only when asked: by ``save=True`` or the
environment variable COURSE_SAVE_FIGS=1 (``make course`` sets it), so a learner's run leaves the repo untouched."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

FIG_DIR = Path(os.environ.get("COURSE_FIG_DIR", Path(__file__).resolve().parent.parent / "figures"))


def savefig(name: str, fig=None, save: bool | None = None):
    """Save ``fig`` (default: the current figure) as figures/<name>.png when saving is on."""
    fig = fig or plt.gcf()
    fig.tight_layout()
    if save if save is not None else os.environ.get("COURSE_SAVE_FIGS") == "1":
        FIG_DIR.mkdir(parents=True, exist_ok=True)
        fig.savefig(FIG_DIR / f"{name}.png", dpi=120, bbox_inches="tight")  # titles and legends outside the axes too


def show_images(images: torch.Tensor, titles=None, rows: int = 1, size: float = 1.4, axes=None):
    """Show a batch of images (N, C, H, W), normalised per image, in a grid; returns the axes."""
    n = len(images)
    cols = (n + rows - 1) // rows
    if axes is None:
        _, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows * 1.15), squeeze=False)
    axes = list(axes.flat) if hasattr(axes, "flat") else list(axes)
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i].detach().cpu().float()
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray")
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    return axes


def scatter_predicted_actual(ax, predicted, actual, title=None, xlabel="predicted", ylabel="actual"):
    """Scatter with a y = x reference line, in the style of Koh & Liang's Figure 2."""
    predicted, actual = torch.as_tensor(predicted).cpu(), torch.as_tensor(actual).cpu()
    ax.scatter(predicted, actual, s=12, alpha=0.7)
    lo = float(min(predicted.min(), actual.min()))
    hi = float(max(predicted.max(), actual.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
