"""The report's table: best mean per column in bold, the right spread, failed cells, per-task fractions."""

from __future__ import annotations

from octssl.tune.report import markdown_table, table_rows
from octssl.tune.summary import SweepCell, SweepSummary


def _cell(task: str, fraction: float, init: str, mean: float | None, std: float = 0.1,
          seed_std: float | None = None) -> SweepCell:
    return SweepCell(task=task, fraction=fraction, init=init, model="fpn", dice_mean=mean, dice_std=std,
                     dice_seed_std=seed_std, n_train_patients=2, n_train_volumes=4)


def test_best_mean_of_each_column_is_bold_and_failed_cells_say_so() -> None:
    summary = SweepSummary(cells=[
        _cell("ga", 0.05, "scratch", 0.50, seed_std=0.20), _cell("ga", 0.05, "ssl-faf", 0.80, seed_std=0.02),
        _cell("ga", 1.0, "scratch", 0.93, seed_std=0.01), _cell("ga", 1.0, "ssl-faf", None),
        _cell("rpd", 0.2, "scratch", 0.40),
    ])
    headers, rows = table_rows(summary, "ga")
    assert headers == ["0.05", "1"]
    assert rows == [("fpn (scratch)", ["50.0 ± 20.0", "93.0 ± 1.0"], [False, True]),
                    ("fpn + ssl-faf", ["80.0 ± 2.0", "failed"], [True, False])]
    table = markdown_table(summary, "ga")
    assert "| fpn + ssl-faf | **80.0 ± 2.0** | failed |" in table
    assert table_rows(summary, "rpd")[0] == ["0.2"]  # each task has its own fractions


def test_one_seed_shows_the_spread_across_test_volumes() -> None:
    summary = SweepSummary(cells=[_cell("ga", 0.1, "scratch", 0.7, std=0.15, seed_std=None)])
    assert table_rows(summary, "ga")[1][0][1] == ["70.0 ± 15.0"]
