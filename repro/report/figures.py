"""The report's figures, drawn with seaborn on matplotlib's Agg backend and returned as PNG data URIs.

Each function takes plain data (DataFrames, arrays) and returns `data:image/png;base64,...` so the page stays one
self-contained file. Nothing here reads run directories; `repro.report.build_report` gathers the data.
"""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")  # no display: figures only ever become PNG bytes

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from scipy import stats  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
VERDICT_COLOURS = {"reproduced": "#2e7d32", "same direction": "#558b2f", "same direction, smaller": "#9e9d24",
                   "same direction, larger": "#9e9d24",
                   "opposite": "#c62828", "not testable on this data": "#bdbdbd",
                   "inconclusive": "#757575", "no paper number": "#5c6bc0"}


def t_band(values) -> tuple[float, float]:
    """Student-t 95% interval of the seeds at one x (the same interval the verdicts use; NaN for one seed)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return (math.nan, math.nan)
    if np.ptp(v) == 0:
        return (float(v[0]), float(v[0]))
    return stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))


def plain(text) -> str:
    """A label as literal text: matplotlib would parse `$...$` from a TOML name or class name as math."""
    return str(text).replace("$", r"\$")


def to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)  # layout="constrained" at creation: one draw, not two
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def relu_tanh_curves(curves: pd.DataFrame, target: float, speedup: str = "", relative: float | None = None) -> str | None:
    """Figure 1: training error against iterations, one line per arm (mean over seeds, band = 95% CI).

    `curves` has columns arm, seed, iteration, train_top1_err.
    """
    if curves.empty:
        return None
    curves = curves.assign(arm=curves["arm"].map(plain))
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    palette = {"relu": "#1565c0", "tanh": "#e65100"}
    sns.lineplot(data=curves, x="iteration", y="train_top1_err", hue="arm", errorbar=t_band, ax=ax,
                 palette={a: palette.get(a.split(" ")[0].split("-")[0], "#444") for a in curves["arm"].unique()},
                 style="arm", dashes={a: ("" if a.startswith("relu") else (4, 2)) for a in curves["arm"].unique()})
    ax.axhline(target, color="#555", lw=1, ls=":")
    ax.text(ax.get_xlim()[1], target, f" {target:g}% target", va="bottom", ha="right", fontsize=8, color="#333")
    if relative is not None and math.isfinite(relative):
        ax.axhline(relative, color="#6a1b9a", lw=1, ls="-.")
        ax.text(ax.get_xlim()[1], relative, f" {relative:.1f}% (dataset-relative)", va="bottom", ha="right",
                fontsize=8, color="#6a1b9a")
    ax.set(xlabel="iterations", ylabel="training error (%)", ylim=(0, max(60.0, float(curves["train_top1_err"].max()) * 1.05)))
    ax.set_title("Figure 1: ReLU against tanh" + (f" (speed-up {speedup})" if speedup else ""), fontsize=10)
    return to_data_uri(fig)


def deltas_chart(rows: pd.DataFrame) -> str | None:
    """Paper against measured effects, one pair of bars per claim/metric, measured with 95% CI error bars.

    `rows` has columns label, paper, mean, lo, hi, verdict.
    """
    rows = rows[rows["paper"].notna()].reset_index(drop=True)
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(8.4, 0.42 * len(rows) + 1.2), layout="constrained")
    y = np.arange(len(rows))
    ax.barh(y - 0.2, rows["paper"], height=0.38, color="#b0bec5", label="paper")
    mean = rows["mean"].astype(float)
    err = np.vstack([(mean - rows["lo"]).clip(lower=0), (rows["hi"] - mean).clip(lower=0)]).astype(float)
    err = np.nan_to_num(err, nan=0.0)
    colours = [VERDICT_COLOURS.get(v, "#757575") for v in rows["verdict"]]
    ax.barh(y + 0.2, mean.fillna(0), height=0.38, xerr=err, color=colours, ecolor="#222", capsize=3,
            label="measured (95% CI)")
    for yi, m in zip(y, mean):
        if not math.isfinite(m):
            ax.text(0, yi + 0.2, " not run", va="center", fontsize=8, color="#c62828")
    ax.axvline(0, color="#222", lw=0.8)
    ax.set_yticks(y, [plain(t) for t in rows["label"]])
    ax.invert_yaxis()
    ax.set_xlabel("effect on error (points)")
    ax.legend(loc="lower right", fontsize=8, frameon=True)
    ax.set_title("Paper against measured effects", fontsize=10)
    return to_data_uri(fig)


def learning_curves(metrics: pd.DataFrame, title: str) -> str | None:
    """Validation (solid) and training (dashed) top-1 error per epoch, one colour per variant, band over seeds.

    `metrics` has columns variant, seed, epoch, val_top1_err, train_top1_err.
    """
    if metrics.empty or metrics["epoch"].nunique() < 2:  # one epoch is a point, not a curve
        return None
    long = metrics.melt(id_vars=["variant", "seed", "epoch"], value_vars=["val_top1_err", "train_top1_err"],
                        var_name="split", value_name="error").dropna(subset=["error"])
    if long.empty:
        return None
    long["split"] = long["split"].map({"val_top1_err": "validation", "train_top1_err": "training"})
    long["variant"] = long["variant"].map(plain)
    fig, ax = plt.subplots(figsize=(6.4, 3.4), layout="constrained")
    sns.lineplot(data=long, x="epoch", y="error", hue="variant", style="split", markers=True, errorbar=t_band,
                 ax=ax, style_order=["validation", "training"])
    ax.set(xlabel="epoch", ylabel="top-1 error (%)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(plain(title), fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return to_data_uri(fig)


def _tile(w: np.ndarray) -> np.ndarray:
    """(K, 3, k, k) kernels -> one RGB mosaic, each kernel stretched to [0, 1] on its own (as Fig. 3 shows them)."""
    k = w.shape[-1]
    cols = 8 if len(w) <= 48 else 16
    rows = math.ceil(len(w) / cols)
    out = np.ones((rows * (k + 1) + 1, cols * (k + 1) + 1, 3))
    for i, ker in enumerate(w):
        img = np.transpose(ker, (1, 2, 0)).astype(float)
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        r, c = divmod(i, cols)
        out[1 + r * (k + 1):1 + r * (k + 1) + k, 1 + c * (k + 1):1 + c * (k + 1) + k] = img
    return out


def filters_grid(towers: list[np.ndarray | None], scores: list[float | None]) -> str | None:
    """Figure 3: conv1 kernels, one panel per tower, titled with that tower's colour-specificity score."""
    towers = [t for t in towers if t is not None]
    if not towers:
        return None
    rows = math.ceil(len(towers[0]) / (8 if len(towers[0]) <= 48 else 16))
    fig, axes = plt.subplots(1, len(towers), figsize=(3.6 * len(towers), 0.5 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for i, (ax, w) in enumerate(zip(axes[0], towers)):
        ax.imshow(_tile(np.asarray(w)), interpolation="nearest")
        s = scores[i] if i < len(scores) else None
        ax.set_title(f"tower {i + 1}" + (f": colour-specificity {s:.2f}" if s is not None else ""), fontsize=9)
        ax.axis("off")
    return to_data_uri(fig)


def retrieval_grid(queries: np.ndarray, neighbours: np.ndarray, query_labels=None, neighbour_labels=None,
                   class_names=None) -> str | None:
    """Figure 4: each row a validation query (first column) and its nearest training images by feature distance."""
    queries, neighbours = np.asarray(queries), np.asarray(neighbours)
    if queries.size == 0:
        return None
    n, k = len(queries), neighbours.shape[1]
    fig, axes = plt.subplots(n, k + 1, figsize=(1.05 * (k + 1), 1.15 * n + 0.3), squeeze=False,
                             layout="constrained")

    def name(label):
        if label is None:
            return ""
        label = int(label)
        known = class_names is not None and 0 <= label < len(class_names)
        return plain(str(class_names[label])[:12]) if known else str(label)

    for r in range(n):
        imgs = [queries[r]] + [neighbours[r, j] for j in range(k)]
        labels = [None if query_labels is None else query_labels[r]] + \
                 [None if neighbour_labels is None else neighbour_labels[r, j] for j in range(k)]
        for c, (ax, img, lab) in enumerate(zip(axes[r], imgs, labels)):
            img = np.asarray(img)
            ax.imshow(img.squeeze(), cmap="gray" if img.ndim == 2 or img.shape[-1] == 1 else None)
            ax.set_xticks([]), ax.set_yticks([])
            same = lab is not None and query_labels is not None and c > 0 and int(lab) == int(query_labels[r])
            for spine in ax.spines.values():
                spine.set_edgecolor("#1565c0" if c == 0 else ("#2e7d32" if same else "#c62828"))
                spine.set_linewidth(2)
            ax.set_title(name(lab), fontsize=6, pad=2)
    fig.suptitle("Figure 4: validation query (left) and nearest training images (green: same label)", fontsize=8)
    return to_data_uri(fig)
