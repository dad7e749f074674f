"""benchmarks/report.py: every benchmark writes its numbers and its tables the same way."""

import json
import sys

import numpy as np

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from report import write_report  # noqa: E402


def test_write_report_puts_json_and_markdown_side_by_side_and_prints_the_tables(tmp_path, capsys):
    out = tmp_path / "new" / "bench"  # its folder made
    write_report(out, {"dice": np.float32(0.75), "n": 3}, ["# Title", "", "| a |", "| --- |"])
    assert json.loads((tmp_path / "new" / "bench.json").read_text()) == {"dice": 0.75, "n": 3}
    assert (tmp_path / "new" / "bench.md").read_text() == "# Title\n\n| a |\n| --- |\n"
    assert capsys.readouterr().out == "# Title\n\n| a |\n| --- |\n"
    write_report(out, {}, "text as it is\n", echo=False)
    assert (tmp_path / "new" / "bench.md").read_text() == "text as it is\n" and capsys.readouterr().out == ""
