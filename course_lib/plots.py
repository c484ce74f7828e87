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


# the landscape figure (chapter 07): one marker per family; colours distinct within a family, and the methods drawn
# as curves over budgets (EK-FAC, TRAK, TracIn, SOURCE, LASSO) each in a colour no other method has
LANDSCAPE_MARKERS = {"baseline": "s", "influence": "o", "training dynamics": "^", "surrogate": "D", "datamodels": "P"}
LANDSCAPE_COLOURS = {
    "random": "#a9a9a9", "class match": "#808000", "pixel similarity": "#469990", "representation similarity": "#9A6324",
    "gradient dot product": "#42d4f4", "gradient cosine": "#f032e6", "influence function (CG)": "#f58231",
    "K-FAC": "#000075", "EK-FAC": "#000000",
    "TracIn": "#3cb44b", "exact unrolling": "#800000", "truncated unrolling": "#f032e6", "SOURCE": "#911eb4",
    "last-layer influence": "#469990", "kNN": "#9A6324", "kNN-Shapley": "#42d4f4", "TRAK": "#e6194b",
    "datamodels (LASSO)": "#4363d8", "datamodels (ridge)": "#800000", "datamodels (difference of means)": "#f58231"}


def landscape(table, panels, ceiling=None, floor: float = 0.01, title: str | None = None,
              ylabel: str = "LDS, evaluation targets (Spearman, 95% interval)",
              own_attributes=("the fixed-seed run", "none")):
    """Chapter 07's figure: LDS against compute, one panel per ground truth, and the legend in a column of its own.

    table: a pandas DataFrame, one row per method and budget, with the columns "key" (a ``landscape.COURSE_METHODS``
    key), "family", "budget" (a number or None), "attributes", "attribution s", "total s" (seconds, training
    included) and one column per name in ``panels`` holding LDS results (``.mean`` and ``.ci``). panels: the
    ground-truth columns, one panel each; the first is the seed-averaged one, the only one with a noise ceiling
    (``ceiling``: an LDS result drawn as a grey band with its mean dotted; None: no ceiling). In the other panels a
    method is drawn hollow unless its "attributes" is in ``own_attributes`` (it attributes the very run the
    ground truth retrains, or no model at all).

    Each point sits at its total seconds (log axis), with a thin line to its left down to its attribution seconds
    alone; a method's budgets are joined, its largest budget written beside the curve's end and the range of its
    budgets in the legend. Model-free rules (milliseconds) are drawn at ``floor`` seconds, and each method is nudged up to
    25% sideways so that no point hides another. The dashed step line is the frontier (``landscape.pareto_front`` of
    total seconds and LDS means). Markers by family (``LANDSCAPE_MARKERS``), colours by method
    (``LANDSCAPE_COLOURS``: distinct within a family).
    Returns the figure; save it with ``savefig``."""
    import numpy as np

    from .landscape import COURSE_METHODS, FAMILIES, pareto_front

    order = sorted(dict.fromkeys(table["key"]), key=lambda k: (FAMILIES.index(COURSE_METHODS[k][0]),
                                                               list(COURSE_METHODS).index(k)))
    spare = iter(plt.cm.tab20.colors)  # a method added to the course and not yet given a colour here
    colour = {key: LANDSCAPE_COLOURS.get(key) or next(spare) for key in order}
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(7 * len(panels) + 2.6, 6.6),
                             gridspec_kw={"width_ratios": [1] * len(panels) + [0.36]})
    handles, span = {}, {}
    for p, (ax, g_name) in enumerate(zip(axes, panels)):
        for j, key in enumerate(order):
            part = table[table["key"] == key].sort_values("budget")
            mean = np.array([s.mean for s in part[g_name]])
            lo = np.array([s.ci[0] for s in part[g_name]])
            hi = np.array([s.ci[1] for s in part[g_name]])
            nudge = 1.12 ** (j % 5 - 2)
            x = part["total s"].clip(lower=floor).to_numpy() * nudge
            filled = p == 0 or part["attributes"].iloc[0] in own_attributes
            c = colour[key]
            ax.hlines(mean, part["attribution s"].clip(lower=floor) * nudge, x, color=c, lw=0.8, alpha=0.45)
            h = ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt=LANDSCAPE_MARKERS[COURSE_METHODS[key][0]] + "-",
                            ms=7, capsize=2, color=c, mfc=c if filled else "white", mew=1.2, elinewidth=0.8, lw=1.3)
            handles.setdefault(key, h)
            budgets = [b for b in part["budget"] if b is not None and b == b]
            if len(budgets) > 1:  # the largest budget beside the curve's end; the range is in the legend
                span[key] = f"{budgets[0]:g}-{budgets[-1]:g}"
                ax.annotate(f"{budgets[-1]:g}", (x[-1], mean[-1]), textcoords="offset points", xytext=(5, 3),
                            fontsize=7, color=c, fontweight="bold",
                            bbox=dict(fc="white", ec="none", alpha=0.75, pad=0.3))
        means = table[g_name].map(lambda s: s.mean)
        front = pareto_front(table["total s"], means)
        ax.step(table["total s"].iloc[front].clip(lower=floor), means.iloc[front], where="post", ls="--", lw=1,
                color="0.35", zorder=0)
        if p == 0 and ceiling is not None:
            ax.axhspan(*ceiling.ci, color="gray", alpha=0.2, lw=0)
            ax.axhline(ceiling.mean, color="gray", ls=":", lw=1)
            ax.text(floor, ceiling.ci[1], " noise ceiling (95% interval)", va="bottom", fontsize=8, color="dimgray")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel(f"CPU seconds on this machine (log scale): training the models\na method needs + attribution; "
                      f"thin line: down to attribution alone;\nmodel-free rules drawn at {floor:g} s; points nudged up "
                      "to 25% sideways", fontsize=9)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{g_name} ground truth" + ("" if p == 0 else "\n(hollow: the method attributes other models "
                                                                   "than the run this ground truth retrains)"),
                     fontsize=10)
    lows = [s.ci[0] for g in panels for s in table[g]]
    highs = [s.ci[1] for g in panels for s in table[g]] + ([ceiling.ci[1]] if ceiling is not None else [])
    for ax in axes[:-1]:
        ax.set_ylim(min(-0.05, min(lows) - 0.03), max(highs) + 0.06)
        ax.set_xlim(floor / 2, float(table["total s"].max()) * 4)
    legend_h, legend_l = [], []
    for fam in FAMILIES:
        keys = [k for k in order if COURSE_METHODS[k][0] == fam]
        if keys:
            legend_h.append(plt.Line2D([], [], ls="")); legend_l.append(f"{fam}:")
            legend_h += [handles[k] for k in keys]
            legend_l += [f"{k} ({span[k]})" if k in span else k for k in keys]
    legend_h += [plt.Line2D([], [], ls=""), plt.Line2D([], [], ls="--", color="0.35", lw=1)]
    legend_l += ["", "frontier: no cheaper method is better"]
    axes[-1].axis("off")
    axes[-1].legend(legend_h, legend_l, loc="center left", fontsize=8, frameon=False, handlelength=2.2,
                    title="method by family (its budgets: first-last;\nbold number beside a curve: its largest budget)",
                    title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
