"""Name lists that are subsets: the record ``tools/prepare_voc.py --skip-missing`` leaves beside them.

When ``prepare_voc.py --skip-missing`` leaves bad ids out of the lists it writes, it records them in
``left_out.json`` in the same folder::

    {"val": {"listed": 1449, "written": 1440, "left_out": {"2007_000033": "<problem>", ...}}, ...}

one entry per list (keyed by the list's file stem) that lost ids; the file is removed by a run that
leaves nothing out. :func:`subset_note` turns that record into the line the tools that read a list
(``tools/infer_seg.py``, ``tools/evaluate.py``) print, so that scores over a subset are not taken
for scores over the whole split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from afa.atomic import write_atomic
from afa.data.voc import DataError, read_name_list

__all__ = ["LEFT_OUT_FILE", "left_out_path", "write_left_out", "subset_note"]

LEFT_OUT_FILE = "left_out.json"


def left_out_path(name_list: str | os.PathLike) -> Path:
    """The ``left_out.json`` that would describe ``name_list`` (the file beside it)."""
    return Path(name_list).parent / LEFT_OUT_FILE


def write_left_out(path: str | os.PathLike, record: dict[str, dict]) -> None:
    """Write ``{list name: {"listed": M, "written": N, "left_out": {id: problem}}}`` atomically."""
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


def subset_note(name_list: str | os.PathLike) -> str | None:
    """``"<list>: N of M listed ids (K left out by prepare_voc --skip-missing, see <path>)"``.

    None when no ``left_out.json`` lies beside ``name_list`` or it does not name this list (by its
    file stem, ``val`` for ``val.txt``). N counts the ids in the list as it is now; when that
    differs from the number recorded as written, the note says that the record may be stale. An
    unreadable record gives a note saying so rather than an error: it is advice, not input.
    """
    path = left_out_path(name_list)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        entry = record.get(Path(name_list).stem) if isinstance(record, dict) else None
        if entry is None:
            return None
        listed, written, left_out = entry["listed"], entry["written"], entry["left_out"]
        if not (isinstance(listed, int) and isinstance(written, int)
                and isinstance(left_out, dict)):
            raise ValueError("expected integers 'listed' and 'written' and a dict 'left_out'")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{name_list}: {path} is unreadable ({exc}); this list may be a subset"
    try:
        now = len(read_name_list(name_list))
    except DataError:
        now = written
    note = (f"{name_list}: {now} of {listed} listed ids ({len(left_out)} left out by "
            f"prepare_voc --skip-missing, see {path})")
    if now != written:
        note += f"; {path} records {written} written ids, so it may be stale"
    return note
