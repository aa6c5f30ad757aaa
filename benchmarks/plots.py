"""Plots of benchmark results (matplotlib, headless): a row of panels, axis labels, grouped bars, the file."""

from __future__ import annotations

from collections.abc import Sequence


def figure(panels: int, size: tuple[float, float]) -> tuple[object, list]:
    """A figure of ``panels`` axes side by side, ``size`` inches in all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
    return fig, list(axes[0])


def label(ax, *, xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
          log2: bool = False, legend_size: float | None = None) -> None:
    """Axis labels, title and legend of one panel; ``log2``: a base-2 logarithmic x axis."""
    if log2:
        ax.set_xscale("log", base=2)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=legend_size)


def grouped_bars(ax, groups: Sequence[str], series: dict[str, Sequence[float]]) -> None:
    """One bar per series in each group, the groups labelled along the x axis."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups)


def save(fig, path: str, dpi: int = 110) -> None:
    """Lay out, write ``path`` and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
