"""The dining index as a bar chart in SVG, drawn on the server (no chart library, no script).

One row per canteen: a track as wide as its capacity and a bar of the people served in the window;
past capacity the bar fills the track and turns to the "over" colour. A canteen without a capacity
gets a bar scaled to the busiest canteen. The numbers are in the text beside each bar and in
``data-*`` attributes, so the same figure reads for a person, a screen reader (the table beside it)
and a test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

ROW_HEIGHT_PX = 44
BAR_HEIGHT_PX = 18
CHART_WIDTH_PX = 440
TRACK_WIDTH_PX = 420
MARGIN_PX = 10


@dataclass(frozen=True)
class Canteen:
    location: str
    served: int
    capacity: int
    load: float
    devices_online: int

    @property
    def percent(self) -> int:
        return round(self.load * 100)


def canteens(index: dict[str, Any]) -> list[Canteen]:
    return [Canteen(location=str(loc["location"]), served=int(loc["served"]), capacity=int(loc["capacity"]),
                    load=float(loc["load"]), devices_online=int(loc["devices_online"]))
            for loc in index.get("locations", [])]


def _bar_width(canteen: Canteen, *, busiest: int) -> int:
    if canteen.capacity > 0:
        share = min(1.0, canteen.served / canteen.capacity)
    else:
        share = canteen.served / busiest if busiest else 0.0
    return round(TRACK_WIDTH_PX * share)


def dining_svg(rows: list[Canteen], *, title_id: str) -> Markup:
    """The chart; ``title_id`` names the element that titles it (aria-labelledby)."""
    busiest = max((c.served for c in rows), default=0)
    height = MARGIN_PX + ROW_HEIGHT_PX * max(1, len(rows))
    parts = [f'<svg class="chart" role="img" aria-labelledby="{escape(title_id)}" '
             f'viewBox="0 0 {CHART_WIDTH_PX} {height}" preserveAspectRatio="xMinYMin meet">']
    if not rows:
        parts.append(f'<text x="{MARGIN_PX}" y="{MARGIN_PX + 10}" class="chart-empty">No canteen has served anyone '
                     'in this window.</text>')
    for i, canteen in enumerate(rows):
        top = MARGIN_PX // 2 + i * ROW_HEIGHT_PX
        bar_top = top + 18
        over = canteen.capacity > 0 and canteen.served > canteen.capacity
        kind = "over" if over else ("busy" if canteen.load >= 0.8 else "ok")
        capacity = f"{canteen.capacity}" if canteen.capacity else "no capacity set"
        label = f"{canteen.location}: {canteen.served} served / {capacity}"
        if canteen.capacity:
            label += f" ({canteen.percent}%)"
        parts.append(
            f'<g class="canteen" data-location="{escape(canteen.location)}" data-served="{canteen.served}" '
            f'data-capacity="{canteen.capacity}">'
            f'<text x="{MARGIN_PX}" y="{top + 12}" class="chart-label">{escape(label)}</text>'
            f'<rect class="track" x="{MARGIN_PX}" y="{bar_top}" width="{TRACK_WIDTH_PX}" height="{BAR_HEIGHT_PX}" '
            f'rx="3"/>'
            f'<rect class="bar bar-{kind}" x="{MARGIN_PX}" y="{bar_top}" '
            f'width="{_bar_width(canteen, busiest=busiest)}" height="{BAR_HEIGHT_PX}" rx="3"/>'
            "</g>")
    parts.append("</svg>")
    return Markup("".join(parts))
