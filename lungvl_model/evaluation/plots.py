"""Evaluation plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lungvl_model.data.targets import LUNG_RADS_CLASSES


def plot_confusion(matrix: list[list[int]], path: Path) -> None:
    """Lung-RADS confusion matrix (rows truth, columns model) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(LUNG_RADS_CLASSES)), LUNG_RADS_CLASSES)
    ax.set_yticks(range(len(LUNG_RADS_CLASSES)), LUNG_RADS_CLASSES)
    ax.set_xlabel("model")
    ax.set_ylabel("reference")
    ax.set_title("Lung-RADS")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
