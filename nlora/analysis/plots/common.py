"""What the plots share: colours, markers, font sizes, titles wrapped to the figure, the legend beside the panels,
the empty panel and the annotated heatmap."""

from __future__ import annotations

import io
import math

from ..report_data import NO_VALUE

MARKERS = "osD^vP*Xhp<>"
PNG_DPI = 110


def drawn(fig):
    """The figure's canvas, drawn as its PNG is: at PNG_DPI, after a first pass that lets the constrained layout
    settle (with an axes of fixed aspect, a heatmap, one pass leaves a label a few pixels outside the figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(PNG_DPI)
    canvas = FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    canvas.draw()
    return canvas


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    drawn(fig).print_png(buffer)
    return buffer.getvalue()


def colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def tick_font(n: int) -> float:
    return max(5.0, 10.0 - n / 4)


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """`text` broken at spaces into lines that fit `width_in` inches at `fontsize` points (about half an em a
    character; mathtext between $ signs is never broken), so that a title is never cut at the figure's edge."""
    limit = max(20, int(width_in * 72 / (0.55 * fontsize)))
    lines = []
    for paragraph in text.split("\n"):
        words, line, in_math = [], "", False
        for word in paragraph.split(" "):  # rejoin the words of a $...$ group
            if in_math:
                words[-1] += " " + word
            else:
                words.append(word)
            in_math ^= word.count("$") % 2 == 1
        for word in words:
            visible = len(line) + 1 + len(word.replace("\\", "").replace("$", ""))
            if line and visible > limit:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return "\n".join(lines)


def legend_beside(fig, handles, labels, **kwargs) -> None:
    """The figure's legend in a column right of its panels: never over the data or the title, however many runs."""
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, **kwargs)


def empty_panel(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.35")
    ax.set_axis_off()


def column_scales(values: list[list[float | None]], columns: list[str] | None) -> list[float]:
    """The value at the top of each column's colour scale: 100 where every column is exact match; where the
    tasks' metrics differ (and so do their usual ranges: SARI near 40, accuracy near 100), each column's own best
    score, so that each column shows its forgetting on its own metric."""
    n = len(values[0]) if values else 0
    if not columns or all(m == "exact_match" for m in columns):
        return [100.0] * n
    best = [max((row[j] for row in values if row[j] is not None), default=0.0) for j in range(n)]
    return [b if b > 0 else 100.0 for b in best]


def heatmap(ax, values: list[list[float | None]], labels: list[str], vmax: float, fmt: str, cmap: str,
             scales: list[float] | None = None, xlabels: list[str] | None = None):
    """`scales`: each column's top of the colour scale (default: `vmax` for all); the cells show the values."""
    import numpy as np
    from matplotlib import colormaps

    data = np.array([[np.nan if x is None else x for x in row] for row in values], dtype=float)
    top = np.array(scales if scales is not None else [vmax] * data.shape[1], dtype=float)
    colormap = colormaps[cmap].with_extremes(bad="0.92")
    image = ax.imshow(data / top[None, :] * vmax, cmap=colormap, vmin=0, vmax=vmax)
    n = len(labels)
    size = tick_font(n)
    xlabels = xlabels or labels
    ax.set_xticks(range(n), xlabels, rotation=40 if max(map(len, labels)) > 4 else 0, ha="right", fontsize=size)
    ax.set_yticks(range(n), labels, fontsize=size)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            x = data[i, j]
            text = NO_VALUE if math.isnan(x) else format(x, fmt)
            red, green, blue, _ = colormap(min(max(x / top[j], 0.0), 1.0)) if not math.isnan(x) else (1, 1, 1, 1)
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(j, i, text, ha="center", va="center", fontsize=max(5.0, size - 1),
                    color="white" if dark else "black")
    return image
