"""The workbook's plot style and small plotting helpers (matplotlib, imported on first use)."""

from __future__ import annotations

__all__ = ["COLORS", "new_axes", "use_style"]

# One colour per method, the same in every notebook.
COLORS = {
    "truth": "#222222",
    "estimate": "#1f77b4",
    "dpo": "#d62728",
    "ipo": "#9467bd",
    "rlhf": "#2ca02c",
    "rpo": "#1f77b4",
    "hypo": "#ff7f0e",
    "data": "#7f7f7f",
}


def use_style() -> None:
    """Readable defaults: larger fonts, light grid, no top/right spines, PNG output for notebooks."""
    import matplotlib as mpl

    mpl.rcParams.update({
        "figure.figsize": (6.4, 3.8),
        "figure.dpi": 100,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 11,
        "legend.frameon": False,
    })


def new_axes(ncols: int = 1, *, width: float = 5.0, height: float = 3.6):
    """``(figure, axes)`` with ``ncols`` side-by-side panels in the workbook style."""
    import matplotlib.pyplot as plt

    use_style()
    figure, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return figure, list(axes[0])
