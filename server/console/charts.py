"""ε spent over rounds as an SVG line chart: geometry only, the template draws it.

Why server-side SVG and no charting library: a handful of lines and one cap
line need no JavaScript, print and zoom crisply, and keep the page usable
with scripts off. Pure: numbers in, coordinates out. Colours come from a
palette that stays distinguishable for the common colour-vision deficiencies,
and each series also gets its own dash pattern and marker, so colour is never
the only cue; the page repeats the numbers in a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

__all__ = ["Chart", "Series", "epsilon_chart"]

# Okabe–Ito palette (colour-blind safe), darkened where needed for 3:1 on white.
_COLOURS: Final = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#7A6A00", "#56B4E9", "#000000")
_DASHES: Final = ("", "6 3", "2 3", "8 3 2 3", "1 2", "10 4", "4 4")
WIDTH: Final = 640
HEIGHT: Final = 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 16, 16, 40


@dataclass(frozen=True, slots=True)
class Point:
    x: float
    y: float
    round: int
    epsilon: float


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    colour: str
    dash: str
    points: list[Point]

    @property
    def polyline(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


@dataclass(frozen=True, slots=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    series: list[Series]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    cap_y: float | None
    cap: float | None
    plot_left: int
    plot_right: int
    plot_top: int
    plot_bottom: int


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / target
    mag = 10.0 ** math.floor(math.log10(raw))
    for mult in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= mult * mag:
            return float(mult * mag)
    return float(10 * mag)


def epsilon_chart(series: dict[str, list[tuple[int, float]]], cap: float | None) -> Chart:
    """Chart of ``{label: [(round, ε after that round)]}`` with an optional cap line."""
    rounds = [r for pts in series.values() for r, _ in pts] or [1]
    eps_values = [e for pts in series.values() for _, e in pts if math.isfinite(e)]
    x_max = max(max(rounds), 1)
    y_top = max([*eps_values, cap or 0.0, 0.1]) * 1.1
    step = _nice_step(y_top)
    y_top = math.ceil(y_top / step) * step
    right, bottom = WIDTH - _RIGHT, HEIGHT - _BOTTOM

    x_hi = x_max if x_max > 1 else 2  # a single round sits mid-chart, not on the edge

    def sx(r: float) -> float:
        return _LEFT + r / x_hi * (right - _LEFT)

    def sy(e: float) -> float:
        return bottom - min(e, y_top) / y_top * (bottom - _TOP)

    out: list[Series] = []
    for i, (label, pts) in enumerate(sorted(series.items())):
        points = [Point(sx(r), sy(e), r, e) for r, e in sorted(pts) if math.isfinite(e)]
        out.append(Series(label, _COLOURS[i % len(_COLOURS)], _DASHES[i % len(_DASHES)], points))
    x_step = max(1, math.ceil(x_max / 10))
    x_ticks = [Tick(sx(r), str(r)) for r in range(x_step, x_max + 1, x_step)]
    y_ticks = [Tick(sy(k * step), f"{k * step:g}") for k in range(round(y_top / step) + 1)]
    return Chart(
        WIDTH,
        HEIGHT,
        out,
        x_ticks,
        y_ticks,
        sy(cap) if cap is not None else None,
        cap,
        _LEFT,
        right,
        _TOP,
        bottom,
    )
