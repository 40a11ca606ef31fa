"""Small scatter and line plots drawn with PIL (the project does not depend on matplotlib): labelled
points, curves (series of points joined by lines, named in a legend), linear or log10 x axis, optional
horizontal reference lines, several panels side by side."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

PANEL_SIZE = (520, 400)
MARGIN = {"left": 70, "right": 20, "top": 40, "bottom": 55}
POINT_RADIUS = 5
# ten distinct colours (the compute curves draw eight series: four factors at two guidance scales)
COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
GRID_COLOUR, AXIS_COLOUR, REFERENCE_COLOUR = (225, 225, 225), (40, 40, 40), (120, 120, 120)


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str


@dataclass(frozen=True)
class Series:
    """A curve: (x, y) points in x order, joined by lines in one colour and named in the legend."""

    label: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Panel:
    """One plot: ``points`` (one colour each, in order), ``series`` (one colour each, in order) and
    horizontal ``references`` (y, label)."""

    title: str
    x_label: str
    y_label: str
    points: tuple[Point, ...]
    log_x: bool = False
    references: tuple[tuple[float, str], ...] = field(default_factory=tuple)
    y_limits: tuple[float, float] | None = None  # None: fitted to the data
    series: tuple[Series, ...] = ()
    legend_right: bool = False  # the series' legend in the top right corner instead of the top left
    log_y: bool = False


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(math.ceil((high - first) / step) + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
    """Decades covering [low, high] (log10 values)."""
    return [float(e) for e in range(math.floor(low), math.ceil(high) + 1)]


def _format(value: float, log: bool) -> str:
    if log:
        number = 10**value
        return f"{number:g}" if 1e-3 <= number < 1e5 else f"1e{round(value)}"
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _axis_range(values: list[float], log: bool, pad: bool = True) -> tuple[list[float], float, float]:
    """Ticks and the range of one axis (padded by 5% unless ``pad`` is False); log axes work in log10
    units and span whole decades."""
    if log:
        values = [math.log10(max(v, 1e-12)) for v in values]
        ticks = _log_ticks(min(values), max(values))
    elif not pad:
        ticks = nice_ticks(min(values), max(values))
    else:
        spread = (max(values) - min(values)) or max(abs(max(values)), 1.0)
        ticks = nice_ticks(min(values) - 0.05 * spread, max(values) + 0.05 * spread)
    return ticks, ticks[0], ticks[-1]


def draw_panel(panel: Panel) -> Image.Image:
    """One panel as an RGB image of ``PANEL_SIZE``."""
    image = Image.new("RGB", PANEL_SIZE, "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    width, height = PANEL_SIZE
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = width - MARGIN["right"], height - MARGIN["bottom"]
    curve_points = [xy for series in panel.series for xy in series.points]
    x_values = [p.x for p in panel.points] + [x for x, _ in curve_points]
    x_ticks, x0, x1 = _axis_range(x_values or [1.0, 10.0], panel.log_x)
    y_values = [p.y for p in panel.points] + [y for _, y in curve_points] + [y for y, _ in panel.references]
    y_values = y_values or [0.0, 1.0]
    y_range = list(panel.y_limits or y_values)
    y_ticks, y0, y1 = _axis_range(y_range, panel.log_y, pad=panel.y_limits is None)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        x = math.log10(max(x, 1e-12)) if panel.log_x else x
        y = math.log10(max(y, 1e-12)) if panel.log_y else y
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for tick in x_ticks:
        px = left + (tick - x0) / (x1 - x0) * (right - left)
        draw.line([(px, top), (px, bottom)], fill=GRID_COLOUR)
        draw.text((px, bottom + 6), _format(tick, panel.log_x), fill=AXIS_COLOUR, font=small, anchor="mt")
    for tick in y_ticks:
        py = bottom - (tick - y0) / (y1 - y0) * (bottom - top)
        draw.line([(left, py), (right, py)], fill=GRID_COLOUR)
        draw.text((left - 6, py), _format(tick, panel.log_y), fill=AXIS_COLOUR, font=small, anchor="rm")
    draw.rectangle([(left, top), (right, bottom)], outline=AXIS_COLOUR)
    for y, label in panel.references:
        _dashed_line(draw, to_pixel(0, y)[1], left, right)
        draw.text((right - 4, to_pixel(0, y)[1] - 3), label, fill=REFERENCE_COLOUR, font=small, anchor="rb")
    for i, point in enumerate(panel.points):
        px, py = to_pixel(point.x, point.y)
        colour = COLOURS[i % len(COLOURS)]
        r = POINT_RADIUS
        draw.ellipse([(px - r, py - r), (px + r, py + r)], fill=colour, outline=AXIS_COLOUR)
        half = small.getlength(point.label) / 2  # centred above the point, kept inside the frame
        at = (min(max(px, left + half + 2), right - half - 2), py - r - 3)
        draw.text(at, point.label, fill=colour, font=small, anchor="mb")
    widest = max((small.getlength(series.label) for series in panel.series), default=0.0)
    legend_x = right - 32 - widest if panel.legend_right else left + 8
    _draw_series(draw, panel.series, to_pixel, small, (legend_x, top + 6))
    draw.text((width / 2, 12), panel.title, fill=AXIS_COLOUR, font=font, anchor="mt")
    draw.text(((left + right) / 2, height - 12), panel.x_label, fill=AXIS_COLOUR, font=font, anchor="ms")
    _vertical_text(image, panel.y_label, font, (8, (top + bottom) / 2))
    return image


def _draw_series(draw: ImageDraw.ImageDraw, series: tuple[Series, ...], to_pixel, font, legend_at) -> None:
    """Each curve as lines between small markers, and a legend (colour, label) from ``legend_at`` down."""
    for i, curve in enumerate(series):
        colour, r = COLOURS[i % len(COLOURS)], POINT_RADIUS - 2
        pixels = [to_pixel(x, y) for x, y in curve.points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([(px - r, py - r), (px + r, py + r)], fill=colour)
        x, y = legend_at[0], legend_at[1] + 16 * i
        draw.line([(x, y + 6), (x + 18, y + 6)], fill=colour, width=2)
        draw.text((x + 24, y), curve.label, fill=colour, font=font)


def _dashed_line(draw: ImageDraw.ImageDraw, y: float, left: float, right: float, dash: int = 6) -> None:
    for x in range(int(left), int(right), 2 * dash):
        draw.line([(x, y), (min(x + dash, right), y)], fill=REFERENCE_COLOUR, width=1)


def _vertical_text(image: Image.Image, text: str, font, at: tuple[float, float]) -> None:
    """``text`` rotated by 90 degrees, its left edge at ``at[0]`` and centred on ``at[1]``."""
    box = font.getbbox(text)
    label = Image.new("RGB", (box[2] + 4, box[3] + 4), "white")
    ImageDraw.Draw(label).text((2, 2), text, fill=AXIS_COLOUR, font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (int(at[0]), int(at[1] - label.height / 2)))


def scatter_plot(panels: list[Panel]) -> Image.Image:
    """The panels side by side, left to right."""
    width, height = PANEL_SIZE
    canvas = Image.new("RGB", (width * len(panels), height), "white")
    for i, panel in enumerate(panels):
        canvas.paste(draw_panel(panel), (i * width, 0))
    return canvas
