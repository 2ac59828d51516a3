"""Plain-text output shared by the benchmarks: aligned tables, medians, ratio lines."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell; text left-aligned, everything else right."""
    widths = [len(header) for header in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells for {len(headers)} columns")
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if _numeric(cell) else cell.ljust(width)
            for cell, width in zip(cells, widths, strict=True)
        ).rstrip()

    print(line(headers))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def median(values: Sequence[float]) -> float:
    """The median; ValueError names the empty sample instead of a bare StatisticsError."""
    if not values:
        raise ValueError("median of no values: the benchmark measured nothing")
    return statistics.median(values)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction 0-1) of a non-empty sample."""
    if not values:
        raise ValueError("percentile of no values: the benchmark measured nothing")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or inf when the baseline measured 0."""
    return numerator / denominator if denominator else float("inf")


def ratio_line(what: str, value: float, digits: int = 2) -> str:
    """The closing line every benchmark prints, e.g. 'ratio: gpufleet/baseline = 0.83'."""
    return f"ratio: {what} = {value:.{digits}f}"


def goal_line(goal: str, met: bool, measured: str) -> str:
    """One line per goal of the issue: what it asks, whether it was met, the figure."""
    return f"goal: {goal}: {'met' if met else 'NOT met'} (measured {measured})"


def _numeric(cell: str) -> bool:
    stripped = cell.replace(",", "").replace(".", "").lstrip("-")
    return stripped.isdigit()
