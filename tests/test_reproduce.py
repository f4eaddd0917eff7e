"""benchmarks/reproduce.py, the one command behind every number on the README: each figure the
README embeds and each table it shows is written by one of its parts, and a part runs end to end."""
import json
import os
import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import reproduce  # noqa: E402  (a script of benchmarks/, imported for its parts)

FIGURE = re.compile(r"!\[[^\]]*\]\((?:docs/)?figures/(\w+)/([\w.-]+)\)")
TABLE = re.compile(r"<!-- table:(\w+) -->")
# the README, and the pages of docs/ whose tables reproduce.py writes as it writes the README's
PAGES = ["README.md"] + [os.path.join("docs", page) for page in reproduce.DOC_PAGES]


def page_text(page):
    with open(os.path.join(REPO, page)) as f:
        return f.read()


@pytest.mark.parametrize("page", PAGES)
def test_every_figure_a_page_embeds_is_written_by_a_part(page):
    embedded = FIGURE.findall(page_text(page))
    assert embedded, f"{page} embeds no figure from docs/figures/"
    for part, name in embedded:
        assert part in reproduce.PARTS, f"no part {part!r} writes docs/figures/{part}/{name}"
        assert name in reproduce.PARTS[part]["figures"], f"part {part} does not write {name}"


@pytest.mark.parametrize("page", PAGES)
def test_every_table_a_page_shows_is_written_by_a_part(page):
    declared = {table for part in reproduce.PARTS.values() for table in part["tables"]}
    shown = TABLE.findall(page_text(page))
    assert shown
    assert set(shown) <= declared, set(shown) - declared


def test_the_readme_tables_are_written_between_their_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- table:recipe -->\nold\n<!-- /table -->\nb\n"
                      "<!-- commit -->\n<!-- /commit -->\n")
    results = {"parts": {"recipe": {"commit": "abc1234", "tables": {"recipe": "| new |"}}}}
    reproduce.write_readme_tables(results, str(readme))
    want = ("a\n<!-- table:recipe -->\n| new |\n<!-- /table -->\nb\n<!-- commit -->\n"
            "The tables and figures on this page are of code commit abc1234 "
            "(docs/results.json).\n<!-- /commit -->\n")
    assert readme.read_text() == want


def test_a_small_run_of_one_part_records_its_numbers_and_figures_and_is_then_current(
        tmp_path, data_dir, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- commit -->\n<!-- /commit -->\n")
    options = ["--data-dir", data_dir, "--only", "latent2", "--docs", str(tmp_path / "docs"),
               "--work", str(tmp_path / "work"), "--readme", str(readme),
               "--train-flags", "--hidden 16 --epochs 1 --iw-samples 2 --gmm-components 2"]
    assert reproduce.main(options) == 0
    results = json.loads((tmp_path / "docs" / "results.json").read_text())
    record = results["parts"]["latent2"]
    assert record["numbers"]["latent"] == 2 and record["seconds"] > 0
    for name in reproduce.PARTS["latent2"]["figures"]:
        assert (tmp_path / "docs" / "figures" / "latent2" / name).stat().st_size > 0
    assert results["machine"]["cores"] == os.cpu_count()
    assert f"code commit {record['commit']}" in readme.read_text()
    capsys.readouterr()
    assert reproduce.main(options) == 0
    assert "latent2: current" in capsys.readouterr().out
