"""A markdown table reader for the tests of generated reports: a table that a renderer would show
differently from what was meant (a row with more or fewer cells than its header, a separator of
another width) is an error."""


def tables(text: str) -> list[list[list[str]]]:
    """Every table of ``text`` as rows of cells (header first, the separator left out)."""
    found, current = [], None
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current = (current or []) + [line]
            continue
        if current:
            found.append(_table(current))
        current = None
    return found


def _cells(line: str) -> list[str]:
    assert line.endswith("|"), f"a table row must end with '|': {line!r}"
    cells, cell, escaped = [], "", False
    for ch in line[1:-1]:
        if ch == "|" and not escaped:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
        escaped = ch == "\\"
    return cells + [cell.strip()]


def _table(lines: list[str]) -> list[list[str]]:
    assert len(lines) >= 2, f"a table needs a header and a separator: {lines}"
    header, separator, *rows = (_cells(line) for line in lines)
    assert all(set(c) <= set("-:") and "-" in c for c in separator), f"not a separator row: {lines[1]!r}"
    assert len(separator) == len(header), f"header has {len(header)} cells, separator {len(separator)}: {lines[:2]}"
    for line, row in zip(lines[2:], rows):
        assert len(row) == len(header), f"{len(row)} cells under a header of {len(header)}: {line!r}"
    return [header, *rows]
