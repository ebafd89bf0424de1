"""Plain-text tables for reports: the first column left-aligned, the others (numbers) right-aligned."""

from __future__ import annotations


def align_columns(rows: list[list[str]], separator: str = " | ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def render(row: list[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return separator.join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in pairs)

    return [render(row) for row in rows]
