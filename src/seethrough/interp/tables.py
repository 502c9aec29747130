"""Plain-text tables with aligned columns (no dependencies).

.. code-block:: python

    print(format_table(["layer", "p(' Paris')"], [[0, 0.0012], [1, 0.5]]))

    layer  p(' Paris')
    -----  -----------
        0       0.0012
        1       0.5000

Numbers are right-aligned, text left-aligned; floats use ``float_format``.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import UsageValueError


def format_cell(value: Any, float_format: str = ".4f") -> str:
    """One cell as text: floats with ``float_format``, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, float_format)
    return str(value)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value.rstrip("%"))
        except ValueError:
            return False
        return True
    return False


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    float_format: str = ".4f",
    align: str | None = None,
    title: str | None = None,
) -> str:
    """``rows`` under ``headers`` as aligned text.

    ``align`` has one letter per column, ``l`` or ``r``; by default columns of
    numbers (or text that reads as a number) are right-aligned, others left.
    """
    if any(len(row) != len(headers) for row in rows):
        raise UsageValueError(f"every row needs {len(headers)} cells, one per header.")
    if align is not None and (len(align) != len(headers) or set(align) - {"l", "r"}):
        raise UsageValueError(f"align needs one of 'l'/'r' per column ({len(headers)}), got {align!r}.")
    cells = [[format_cell(value, float_format) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    if align is None:
        align = "".join(
            "r" if rows and all(_is_number(row[i]) or row[i] is None for row in rows) else "l"
            for i in range(len(headers))
        )

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(list(headers)))
    out.append(line(["-" * w for w in widths]))
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def bar(fraction: float, width: int = 20) -> str:
    """A text bar of ``fraction`` (0..1) of ``width`` characters."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "#" * filled + "." * (width - filled)


def section(title: str, explanation: str = "") -> str:
    """A heading with an underline and an optional plain-English explanation."""
    text = f"{title}\n{'=' * len(title)}"
    return f"{text}\n{explanation}" if explanation else text
