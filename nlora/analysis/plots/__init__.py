"""The report's PNG plots, one module per kind. They use matplotlib's object API with the Agg canvas, so no display
and no global pyplot state is involved."""

from .accuracy import plot_accuracy_matrices, plot_accuracy_over_sequence
from .common import drawn, png_bytes
from .general import plot_general
from .parameters import plot_collision_heatmaps, plot_layer_bars, plot_nuclear_norms
from .training import plot_training_curves

__all__ = ["drawn", "png_bytes", "plot_accuracy_matrices", "plot_accuracy_over_sequence", "plot_collision_heatmaps", "plot_general",
           "plot_layer_bars", "plot_nuclear_norms", "plot_training_curves"]
