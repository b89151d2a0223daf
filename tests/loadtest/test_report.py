"""The docs' generated blocks and tables: markdown tables, a block replaced in place, and
the soak's per-process and per-10-minute tables (pure logic, windows written by hand)."""

from __future__ import annotations

import re

import pytest

from loadtest.report import (
    generated_names,
    markdown_table,
    replace_generated,
    write_block,
)
from loadtest.soak_report import Window, process_table, windows_table


def test_a_table_aligns_right_the_columns_marked_for_figures() -> None:
    table = markdown_table(["name", ">calls"], [("a", 1), ("b", 20)])
    assert table.splitlines() == ["| name | calls |", "| --- | ---: |", "| a | 1 |", "| b | 20 |"]


def test_a_generated_block_is_replaced_and_the_rest_kept(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# T\n\n<!-- generated:x -->\nold\n<!-- /generated:x -->\n\nafter\n")
    replace_generated(page, "x", "new\nlines\n")
    assert page.read_text() == (
        "# T\n\n<!-- generated:x -->\nnew\nlines\n<!-- /generated:x -->\n\nafter\n"
    )


def test_a_page_without_the_block_is_refused_and_left_alone(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# T\n<!-- generated:y -->\n")
    with pytest.raises(ValueError, match="generated:x"):
        replace_generated(page, "x", "new")
    with pytest.raises(ValueError, match="/generated:y"):
        replace_generated(page, "y", "new")
    assert page.read_text() == "# T\n<!-- generated:y -->\n"


def test_a_page_names_its_generated_blocks_in_order(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- generated:b-1 -->\n<!-- /generated:b-1 -->\n<!-- generated:a -->\n")
    assert generated_names(page) == ["b-1", "a"]


def test_a_bench_block_says_when_and_where_it_was_measured(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- generated:bench-x -->\nold\n<!-- /generated:bench-x -->\nend\n")
    write_block(page, "bench-x", "| a |")
    text = page.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert re.search(
        r"generated:bench-x -->\n\d{4}-\d\d-\d\d \d\d:\d\d UTC at .*, \d+ cores\.\n\n\| a \|", text
    )


def window(start_s: float, cpu: float, rss: float, fault: str = "") -> Window:
    processes = {"decision-server": (cpu, rss), "soak-client": (1.0, 100.0)}
    return Window(start_s, start_s + 10, 1000, {}, 1.0, 4.0, 20.0, 0, 90.0, 0, 0, processes, fault)


def test_the_process_table_compares_the_first_and_last_part_without_the_faults() -> None:
    windows = [window(0, 10, 200), window(10, 30, 300, fault="redis@10+5"), window(20, 20, 220)]
    windows += [window(30, 99, 999, fault="primary@30+5"), window(40, 16, 210)]
    # Parts of 20 s: the first is 0-20 (the fault window left out), the last 30-50.
    caption, _, *table = process_table(windows, 20, "a run").splitlines()
    assert caption == "a run; the machine 0 % busy, host steal 0.00 %:"
    assert table[0] == (
        "| process group | CPU, % of one core (first / last 20 s) | RSS MB (first / last 20 s) |"
    )
    assert table[2] == "| decision-server | 10.0 / 16.0 | 200 / 210 |"
    assert table[3] == "| soak-client | 1.0 / 1.0 | 100 / 100 |"
    assert table[4] == "| **the stack** | **10.0 / 16.0** | **200 / 210** |"


def test_a_short_run_compares_its_halves() -> None:
    windows = [window(0, 10, 200), window(10, 12, 200), window(20, 20, 250), window(30, 22, 250)]
    caption, _, *table = process_table(windows, part_s=600).splitlines()
    assert caption == "the machine 0 % busy, host steal 0.00 %:"
    assert table[2] == "| decision-server | 11.0 / 21.0 | 200 / 250 |"


def test_the_steady_windows_are_summed_up_per_part_of_the_run() -> None:
    windows = [window(0, 10, 200), window(10, 10, 200, fault="redis@10+5"), window(20, 10, 200)]
    windows[2].p99_ms, windows[2].late, windows[2].model_share = 30.0, 2, 0.98
    windows += [window(30, 10, 200)]
    # Parts of 20 s: 0-20 holds one steady window (the fault's left out), 20-40 two.
    _, _, first, second = windows_table(windows, 20).splitlines()
    assert first == "| 0-0 | 1 | 1 | 100.0 % | 20.0 / 20.0 | 4.0 | 0 | 90 ms |"
    assert second == "| 0-1 | 2 | 1 | 98.0 % | 25.0 / 30.0 | 4.0 | 2 | 90 ms |"
