"""benchmarks/table.py: rows from result files in name order, skipped parts named, the README block replaced."""

from __future__ import annotations

import json

import pytest

import table


def test_rows_follow_file_names_and_name_what_was_skipped(tmp_path) -> None:
    stacks = [{"workers": 1, "files_per_s": 2.5, "mb_per_s": 30.0}, {"workers": 2, "files_per_s": 3.0, "mb_per_s": 35.0}]
    for name in ("ingest-b.json", "ingest-a.json"):
        (tmp_path / name).write_text(json.dumps({"device": "CPU: test", "load_avg_1m_before": 1.5,
                                                 "real_vol": "skipped: no real files",
                                                 "raster_stack_49x496x512": stacks}))
    rows = table.table(tmp_path).splitlines()
    assert len(rows) == 4 and "`ingest-a.json`" in rows[2] and "`ingest-b.json`" in rows[3]
    assert rows[2] == ("| ingest | CPU: test (1.5) | Heidelberg .vol: skipped: no real files; "
                       "raster stacks 3.0 files/s, 35 MB/s (2 workers) | `ingest-a.json` |")


def test_only_the_block_between_the_markers_is_replaced() -> None:
    text = f"intro\n{table.START}\nold rows\n{table.END}\noutro\n"
    assert table.with_table(text, "| new |") == f"intro\n{table.START}\n| new |\n{table.END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        table.with_table("no markers here", "| new |")
