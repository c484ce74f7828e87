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


# the landscape figure (chapter 07): one marker per family, one colour per method (no two methods share one, so a
# point's colour and marker name its method)
LANDSCAPE_MARKERS = {"baseline": "s", "influence": "o", "training dynamics": "^", "surrogate": "D", "datamodels": "P"}
LANDSCAPE_COLOURS = {
    "random": "#a9a9a9", "class match": "#808000", "pixel similarity": "#469990", "representation similarity": "#9A6324",
    "gradient dot product": "#42d4f4", "gradient cosine": "#f032e6", "influence function (CG)": "#f58231",
    "K-FAC": "#000075", "EK-FAC": "#000000",
    "TracIn": "#3cb44b", "exact unrolling": "#800000", "truncated unrolling": "#e377c2", "SOURCE": "#911eb4",
    "last-layer influence": "#2f4f4f", "kNN": "#b8860b", "kNN-Shapley": "#7b68ee", "TRAK": "#e6194b",
    "datamodels (LASSO)": "#4363d8", "datamodels (ridge)": "#7b4173", "datamodels (difference of means)": "#637939"}


def _dodge(table, order, g_name: str, floor: float, step: float = 1.22, dx: float = 0.07, dy: float = 0.02) -> dict:
    """{key: factor}: every method's points are drawn at factor x their seconds (one factor for all its points and
    panels), the first of 1, step, 1/step, step^2, 1/step^2 that keeps them clear of the methods placed before it
    in ``order`` (apart by at least ``dx`` in log10 seconds or ``dy`` in LDS, on the panel ``g_name``); the least
    crowded of them if none does."""
    import numpy as np

    placed_x, placed_y, out = np.empty(0), np.empty(0), {}
    for key in order:
        part = table[table["key"] == key]
        lx = np.log10(part["total s"].clip(lower=floor).to_numpy(float))
        y = np.array([s.mean for s in part[g_name]], float)
        best = None
        for f in (1.0, step, 1 / step, step ** 2, step ** -2):
            near = (np.abs(lx[:, None] + np.log10(f) - placed_x[None, :]) < dx) & (np.abs(y[:, None] - placed_y) < dy)
            if best is None or near.sum() < best[0]:
                best = (int(near.sum()), f)
            if best[0] == 0:
                break
        out[key] = best[1]
        placed_x, placed_y = np.concatenate([placed_x, lx + np.log10(best[1])]), np.concatenate([placed_y, y])
    return out


def landscape(table, panels, ceiling=None, floor: float = 0.01, title: str | None = None,
              ylabel: str = "LDS, evaluation targets (Spearman, 95% interval)",
              own_attributes=("the fixed-seed run", "none"), alone=()):
    """Chapter 07's figure: LDS against compute, one panel per ground truth, and the legend in a column of its own.

    table: a pandas DataFrame, one row per method and budget, with the columns "key" (a ``landscape.COURSE_METHODS``
    key), "family", "budget" (a number or None), "attributes", "attribution s", "total s" (seconds, training
    included) and one column per name in ``panels`` holding LDS results (``.mean`` and ``.ci``); "method" (the row's
    label) when ``alone`` is given. panels: the ground-truth columns, one panel each; the first is the seed-averaged
    one, the only one with a noise ceiling (``ceiling``: an LDS result drawn as a grey band with its mean dotted;
    None: no ceiling). In the other panels a method is drawn hollow unless its "attributes" is in ``own_attributes``
    (it attributes the very run the ground truth retrains, or no model at all). alone: row labels drawn as a point of
    their own, not joined to their method's budgets (another estimator under the same key, e.g. TracIn over every
    step beside TracInCP's checkpoints), named beside the point.

    Each point sits at its total seconds (log axis), with a thin line to its left down to its attribution seconds
    alone; a method's budgets are joined, its largest budget written beside the curve's end and the range of its
    budgets in the legend. Seconds under ``floor`` (the model-free rules' milliseconds) are drawn at ``floor``, and a
    method whose points would hide another's is nudged up to 50% sideways (``_dodge``). The dashed step line is the
    frontier (``landscape.pareto_front`` of total seconds and LDS means). Markers by family (``LANDSCAPE_MARKERS``),
    colours by method (``LANDSCAPE_COLOURS``). Returns the figure; save it with ``savefig``."""
    import numpy as np

    from .landscape import COURSE_METHODS, FAMILIES, pareto_front

    order = sorted(dict.fromkeys(table["key"]), key=lambda k: (FAMILIES.index(COURSE_METHODS[k][0]),
                                                               list(COURSE_METHODS).index(k)))
    spare = iter(plt.cm.tab20.colors)  # a method added to the course and not yet given a colour here
    colour = {key: LANDSCAPE_COLOURS.get(key) or next(spare) for key in order}
    lone = table["method"].isin(list(alone)).to_numpy() if len(alone) else np.zeros(len(table), bool)
    nudge = _dodge(table, order, panels[0], floor)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(7 * len(panels) + 2.6, 6.6),
                             gridspec_kw={"width_ratios": [1] * len(panels) + [0.36]})
    handles, span = {}, {}
    for p, (ax, g_name) in enumerate(zip(axes, panels)):
        for key in order:
            mine = (table["key"] == key).to_numpy()
            c, marker = colour[key], LANDSCAPE_MARKERS[COURSE_METHODS[key][0]]
            for part, joined in ((table[mine & ~lone].sort_values("budget"), True), (table[mine & lone], False)):
                if not len(part):
                    continue
                mean = np.array([s.mean for s in part[g_name]])
                lo = np.array([s.ci[0] for s in part[g_name]])
                hi = np.array([s.ci[1] for s in part[g_name]])
                x = part["total s"].clip(lower=floor).to_numpy() * nudge[key]
                filled = p == 0 or part["attributes"].iloc[0] in own_attributes
                ax.hlines(mean, part["attribution s"].clip(lower=floor) * nudge[key], x, color=c, lw=0.8, alpha=0.45)
                h = ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt=marker + ("-" if joined else ""), ms=7,
                                capsize=2, color=c, mfc=c if filled else "white", mew=1.2, elinewidth=0.8, lw=1.3)
                handles.setdefault(key, h)
                if not joined:  # name the lone point by what its label adds to the method's name
                    for xi, yi, label in zip(x, mean, part["method"]):
                        ax.annotate(label.removeprefix(key).lstrip(", ") or label, (xi, yi),
                                    textcoords="offset points", xytext=(5, -10), fontsize=7, color=c, zorder=6,
                                    bbox=dict(fc="white", ec="none", alpha=0.75, pad=0.3))
                    continue
                budgets = [b for b in part["budget"] if b is not None and b == b]
                if len(budgets) > 1:  # the largest budget beside the curve's end; the range is in the legend
                    span[key] = f"{budgets[0]:g}-{budgets[-1]:g}"
                    ax.annotate(f"{budgets[-1]:g}", (x[-1], mean[-1]), textcoords="offset points", xytext=(5, 3),
                                fontsize=7, color=c, fontweight="bold", zorder=6,
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
                      f"thin line: down to attribution alone;\ntimes under {floor:g} s drawn at {floor:g} s; points "
                      "nudged up to 50% sideways", fontsize=9)
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


def lds_errorbar(ax, x, scores, **kw):
    """LDS values (``lds.Score``s) at positions ``x``: their means as points (joined by ``fmt``'s line, if any) and
    their 95% intervals as error bars; ``kw`` goes to ``ax.errorbar`` (fmt, color, label, ...)."""
    import numpy as np

    mean = np.array([s.mean for s in scores])
    ci = np.array([s.ci for s in scores]).reshape(-1, 2)
    return ax.errorbar(list(x), mean, yerr=[mean - ci[:, 0], ci[:, 1] - mean], capsize=3, **kw)


def reference_line(ax, score, label=None, color="gray", ls="--", bar_at=None):
    """A reference LDS (an ``lds.Score``) across the whole axis: its mean as a line labelled for the legend, and its
    95% interval either as a band of the same colour (``bar_at=None``) or as a short thick vertical bar at
    ``bar_at`` (an x position in axes coordinates, 0 = left edge, 1 = right), which keeps several references'
    intervals apart where bands would overlap."""
    ax.axhline(score.mean, color=color, ls=ls, lw=1.3, label=label)
    if bar_at is None:
        ax.axhspan(*score.ci, color=color, alpha=0.12, lw=0)
    else:
        ax.plot([bar_at, bar_at], score.ci, color=color, lw=4, alpha=0.6, solid_capstyle="butt",
                transform=ax.get_yaxis_transform())


def reference_lines(ax, refs, legend: bool = True, right: float = 0.975, step: float = 0.025):
    """Several ``reference_line``s: ``refs`` is a list of (label, score, colour, line style). The first one's interval
    is a band; the others' are bars side by side ending at ``right`` (axes coordinates), so that none hides another.
    ``legend=False`` draws them without labels (a second panel that shares the first one's legend)."""
    for j, (label, score, color, ls) in enumerate(refs):
        reference_line(ax, score, label if legend else None, color, ls,
                       bar_at=None if j == 0 else right - step * (len(refs) - j))


def plain_log_ticks(axis, lo: float, hi: float):
    """Ticks of a log-scaled ``axis`` (``ax.xaxis`` or ``ax.yaxis``) at 1, 2, 5 x powers of ten between ``lo`` and
    ``hi``, labelled as plain numbers (10, 20, 50 rather than 10^1, 2 x 10^1), no minor ticks."""
    import math

    powers = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10 ** e for e in powers for m in (1, 2, 5) if lo <= m * 10 ** e <= hi]
    if len(ticks) < 3:  # a narrow range: every integer multiple
        ticks = [m * 10 ** e for e in powers for m in range(1, 10) if lo <= m * 10 ** e <= hi]
    axis.set_ticks(ticks, [f"{t:g}" for t in ticks])
    axis.set_minor_locator(plt.NullLocator())
