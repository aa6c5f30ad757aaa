"""The loss / accuracy plot written at the end of a run (PNG, matplotlib's Agg backend)."""

from __future__ import annotations


def plot_run(path: str, train: list[dict], evals: list[dict], chance: float | None, title: str) -> None:
    """train: [{"iteration", "loss"}], evals: [{"iteration", "loss", "acc_cross", "acc_same"}] → PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = any(e.get("acc_cross") is not None or e.get("acc_same") is not None for e in evals)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([t["iteration"] for t in train], [t["loss"] for t in train], lw=0.8, label="train")
    if evals:
        ax.plot([e["iteration"] for e in evals], [e["loss"] for e in evals], "o-", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (scored tokens)")
    ax.legend()
    if has_acc:
        ax = axes[0][1]
        for key, label in (("acc_cross", "answer's fact on another rank"), ("acc_same", "answer's fact on this rank")):
            points = [(e["iteration"], e[key]) for e in evals if e.get(key) is not None]
            if points:
                ax.plot(*zip(*points), "o-", label=label)
        if chance is not None:
            ax.axhline(chance, color="gray", ls="--", label="chance: cross-shard answers without ring attention")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("iteration")
        ax.set_ylabel("recall accuracy (validation)")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
