"""PNG plots for reports and the console: metrics of evaluation runs side by side, training loss curves.

matplotlib with the Agg backend (no display); imported only by these commands (~0.5 s). Files are
written whole or not at all.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from appliance.home import atomic_write


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metrics_png(runs: list[dict], out: Path) -> list[str]:
    """One small panel per metric the runs share, one bar per run. Returns the metrics drawn."""
    plt = _figure()
    keys = sorted(set.intersection(*(set(k for k, v in r["metrics"].items() if isinstance(v, int | float)
                                         and not math.isnan(v)) for r in runs)))
    keys = [k for k in keys if k not in ("terms",)]
    if not keys:
        from appliance.errors import UsageError

        raise UsageError("these runs share no metric to plot", "compare runs of the same suite")
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    labels = [r["id"].replace("eval-", "") + f"\n{r['model']}" for r in runs]
    for ax, key in zip(axes.flat, keys):
        ax.bar(range(len(runs)), [r["metrics"][key] for r in runs], color=[f"C{i}" for i in range(len(runs))])
        ax.set_title(key, fontsize=9)
        ax.set_xticks(range(len(runs)), labels, fontsize=6)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, plt, out)
    return keys


def loss_png(curves: dict[str, list[float]], out: Path) -> None:
    """Training loss per step, one line per run."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, plt, out)


def _save(fig, plt, out: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, buf.getvalue(), mode=0o644)


def served_drift_png(res: dict, out: Path) -> list[str]:
    """A deployment's served drift (`eval drift --deployment`): each measure against its limit, and the two
    windows' refusal and error rates side by side. Numbers only, never record text. Returns the measures drawn."""
    plt = _figure()
    keys = [k for k, v in res["metrics"].items() if v is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.4))
    values = [abs(res["metrics"][k]) for k in keys]
    left.bar(range(len(keys)), values, color=["C3" if k in res["drifted"] else "C0" for k in keys])
    left.scatter(range(len(keys)), [res["limits"][k] for k in keys], marker="_", s=400, color="k", label="limit")
    left.set_xticks(range(len(keys)), keys, fontsize=7, rotation=20)
    left.set_title(f"{res['deployment']}: recent window against the one before", fontsize=9)
    left.legend(fontsize=7)
    rates = ("refusal_rate", "error_rate")
    for i, (name, w) in enumerate((("earlier", res["earlier"]), ("recent", res["recent"]))):
        right.bar([j + 0.38 * i for j in range(len(rates))], [w[r] or 0.0 for r in rates], width=0.38,
                  label=f"{name} ({w['records']} records)")
    right.set_xticks([j + 0.19 for j in range(len(rates))], rates, fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, plt, out)
    return keys
