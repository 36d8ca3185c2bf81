"""The census table: one row per member, named columns, written as CSV (``pandas.read_csv`` loads it as it is)."""

from __future__ import annotations

import csv
import io
import math
import os

import numpy as np

__all__ = ["CensusTable", "read_table"]


class CensusTable:
    """Columns of equal length (numbers, booleans or strings), in insertion order.

    >>> t = CensusTable({"member": np.arange(2), "t_escape": np.array([1.5, np.inf])})
    >>> read_table(io.StringIO(t.to_csv()))["t_escape"].tolist()
    [1.5, inf]
    """

    def __init__(self, columns: dict):
        cols = {str(k): np.asarray(v) for k, v in columns.items()}
        lengths = {k: v.shape for k, v in cols.items()}
        n = {s[0] if len(s) == 1 else -1 for s in lengths.values()}
        if len(n) > 1 or -1 in n:
            raise ValueError(f"`columns` must be 1-D arrays of one length; got shapes {lengths}.")
        self.columns = cols

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; columns: {list(self.columns)}")
        return self.columns[name]

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    def to_csv(self, path: os.PathLike | str | None = None) -> str:
        """The CSV text (a header row, then one row per member; floats with 17 significant digits, ``inf``/``nan``
        as pandas reads them); written atomically to ``path`` if given."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.names)
        cols = [self.columns[k] for k in self.names]
        for i in range(len(self)):
            w.writerow([_cell(c[i]) for c in cols])
        text = buf.getvalue()
        if path is not None:
            from ..store import atomic_write_text

            atomic_write_text(path, text)
        return text

    def to_pandas(self):
        """A ``pandas.DataFrame`` (pandas is optional: ``ImportError`` with a hint if missing)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_pandas needs pandas (`pip install pandas`); the CSV file loads without it.") from e
        return pd.DataFrame(self.columns)


def _cell(v):
    if isinstance(v, (bool, np.bool_)):
        return "True" if v else "False"
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return repr(f) if math.isfinite(f) else ("nan" if math.isnan(f) else ("inf" if f > 0 else "-inf"))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return str(v)


def _column(values: list[str]) -> np.ndarray:
    if all(v in ("True", "False") for v in values) and values:
        return np.array([v == "True" for v in values])
    try:
        ints = [int(v) for v in values]
        return np.array(ints, dtype=np.int64)
    except ValueError:
        pass
    try:
        return np.array([float(v) for v in values])
    except ValueError:
        return np.array(values, dtype=object)


def read_table(path_or_file) -> CensusTable:
    """Read a table written by :meth:`CensusTable.to_csv` (a path or an open text file)."""
    if hasattr(path_or_file, "read"):
        rows = list(csv.reader(path_or_file))
    else:
        with open(path_or_file, newline="") as f:
            rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path_or_file!r} holds no header row.")
    head, body = rows[0], rows[1:]
    return CensusTable({h: _column([r[j] for r in body]) for j, h in enumerate(head)})
