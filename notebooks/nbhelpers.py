"""
What the notebooks share, so that each cell reads as the step it performs: the figure style, and
(below) the training loops of notebook 05.

    from nbhelpers import figure
    fig, ax = figure()                  # one readable panel: 900 px wide, 11 pt labels
    fig, (a, b) = figure(ncols=2)
"""
import matplotlib.pyplot as plt

STYLE = {"figure.dpi": 100, "savefig.dpi": 100, "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 10, "axes.grid": True,
         "grid.alpha": 0.3}


def figure(ncols: int = 1, nrows: int = 1, width: float = 9.0, height: float = 3.6, **kwargs):
    """plt.subplots in the notebooks' style: `width` inches at 100 dpi (900 px by default, at least
    600 px), labels of at least 10 pt, a light grid. Returns (fig, ax) or (fig, axes)."""
    plt.rcParams.update(STYLE)
    return plt.subplots(nrows, ncols, figsize=(width, height * nrows), layout="constrained", **kwargs)
