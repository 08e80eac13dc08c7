#!/usr/bin/env python3
"""Bar charts of the Lattice-vs-Synapse benchmark: one small panel per metric.

    python bench/synapse/chart.py RESULTS.json OUT.png

matplotlib comes with the Synapse venv: `"$(scripts/synapse.sh install)/bin/python"
bench/synapse/chart.py ...`. RESULTS.json:

    {"machine": "2 vCPU ...", "commit": "abc1234",
     "metrics": [{"name": "send, 1 sender (events/s)", "lattice": 123.4, "synapse": 45.6,
                  "higher_is_better": true,
                  "lattice_spread": [min, max], "synapse_spread": [min, max]}, ...]}

The spreads are optional (error bars from min to max over the runs); a value may be null (not
measured), which leaves its bar out. Each panel's title gives Lattice/Synapse and which way is
better, so a ratio above 1 with "higher is better" (or below 1 with "lower is better") favours
Lattice.
"""

import json
import math
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

COLORS = {"Lattice": "#2b6cb0", "Synapse": "#8a8f98"}
MAX_COLUMNS = 3


def number(value):
    """A finite float, or None."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def error_bar(value, spread):
    """(below, above) for an error bar from a [min, max] spread around value; (0, 0) if none."""
    if value is None or not spread or len(spread) != 2:
        return 0.0, 0.0
    low, high = number(spread[0]), number(spread[1])
    if low is None or high is None:
        return 0.0, 0.0
    return max(0.0, value - min(low, high)), max(0.0, max(low, high) - value)


def fmt(value):
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def panel_title(metric, lattice, synapse):
    name = "\n".join(textwrap.wrap(str(metric.get("name", "?")), 40))
    direction = "higher is better" if metric.get("higher_is_better", True) else "lower is better"
    if lattice is None or synapse is None or synapse == 0:
        return f"{name}\nLattice/Synapse n/a · {direction}"
    return f"{name}\nLattice/Synapse {lattice / synapse:.2f}× · {direction}"


def draw(metric, ax):
    lattice, synapse = number(metric.get("lattice")), number(metric.get("synapse"))
    labels = ["Lattice", "Synapse"]
    values = [lattice, synapse]
    errors = [
        error_bar(lattice, metric.get("lattice_spread")),
        error_bar(synapse, metric.get("synapse_spread")),
    ]
    heights = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(labels, heights, color=[COLORS[label] for label in labels], width=0.6)
    for bar, value, (below, above) in zip(bars, values, errors):
        if value is not None and (below or above):
            ax.errorbar(
                bar.get_x() + bar.get_width() / 2,
                value,
                yerr=[[below], [above]],
                fmt="none",
                ecolor="#222222",
                elinewidth=1.2,
                capsize=6,
            )
    top = max([h + e[1] for h, e in zip(heights, errors)] + [0.0])
    ax.set_ylim(0, top * 1.18 if top > 0 else 1)
    for bar, value, (_, above) in zip(bars, values, errors):
        ax.annotate(
            fmt(value),
            (bar.get_x() + bar.get_width() / 2, bar.get_height() + above),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_title(panel_title(metric, lattice, synapse), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def chart(results, out):
    metrics = results.get("metrics") or []
    if not metrics:
        raise SystemExit("no metrics in the input")
    columns = min(MAX_COLUMNS, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.3 * columns, 3.4 * rows + 0.7), squeeze=False
    )
    for ax, metric in zip(axes.flat, metrics):
        draw(metric, ax)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    subtitle = " · ".join(
        str(results[k]) for k in ("machine", "commit") if results.get(k) is not None
    )
    fig.suptitle(
        "Lattice vs Synapse" + (f"\n{subtitle}" if subtitle else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        results = json.load(f)
    chart(results, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
