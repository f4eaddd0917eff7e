"""benchmarks/reproduce.py, the one command behind every number on the README: each figure the
README embeds and each table it shows is written by one of its parts, and a part runs end to end."""
import argparse
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


def test_a_quick_run_never_names_the_repositorys_docs_or_readme(data_dir, capsys, tmp_path,
                                                               monkeypatch):
    # the repository stands in at tmp_path: were the refusal missing, nothing real is written
    monkeypatch.setattr(reproduce, "ROOT", str(tmp_path))
    (tmp_path / "README.md").write_text("the README\n")
    for flag, path in (("--docs", str(tmp_path / "docs")),
                       ("--readme", str(tmp_path / "README.md"))):
        code = reproduce.main(["--data-dir", data_dir, "--only", "latent2", flag, path,
                               "--train-flags", "--epochs 1"])
        err = capsys.readouterr().err
        assert code == 2
        assert "a quick run never writes the repository's docs/ or README.md" in err


def test_a_quick_run_writes_a_scratch_folder_and_the_default_one_the_repositorys(
        tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "ROOT", str(tmp_path))
    (tmp_path / "README.md").write_text("the README\n")
    quick = argparse.Namespace(docs=None, readme=None, train_flags="--epochs 1")
    lines = []
    reproduce.output_paths(quick, lines.append)
    scratch = tmp_path / "runs" / "reproduce-quick"
    assert (quick.docs, quick.readme) == (str(scratch / "docs"), str(scratch / "README.md"))
    assert (scratch / "README.md").read_text() == "the README\n"
    assert "not the README's" in lines[0]
    default = argparse.Namespace(docs=None, readme=None, train_flags="")
    reproduce.output_paths(default, lines.append)
    assert (default.docs, default.readme) == (str(tmp_path / "docs"), str(tmp_path / "README.md"))


def test_a_part_made_by_a_quick_run_is_not_current_for_the_default_command(tmp_path):
    record = {"code": "abc", "figures": [], "train_flags": "--epochs 1", "dataset": "mnist"}
    assert reproduce.is_current("holes", record, "abc", str(tmp_path), "--epochs 1")
    assert not reproduce.is_current("holes", record, "abc", str(tmp_path), "")
    assert reproduce.is_current("holes", {**record, "train_flags": ""}, "abc", str(tmp_path))


def test_runs_on_other_data_or_with_other_flags_are_never_reused_as_current():
    record = {"code": "abc", "figures": [], "train_flags": "", "data_dir": "/data/fashion",
              "dataset": "fashion"}
    assert reproduce.is_current("holes", record, "abc", "/nowhere", "", "/data/fashion", "fashion")
    assert not reproduce.is_current("holes", record, "abc", "/nowhere", "", "/data/mnist",
                                    "fashion")
    # the same folder read as another dataset; a record from before datasets were recorded
    assert not reproduce.is_current("holes", record, "abc", "/nowhere", "", "/data/fashion",
                                    "mnist")
    older = {key: value for key, value in record.items() if key != "dataset"}
    assert reproduce.is_current("holes", older, "abc", "/nowhere", "", "/data/fashion", "fashion")
    assert not reproduce.is_current("holes", older, "abc", "/nowhere", "", "/data/fashion")


def test_the_minimal_part_passes_train_py_only_the_flags_it_takes():
    flags = ["--train-images", "2000", "--epochs", "1", "--hidden", "32", "--iw-samples", "2"]
    assert reproduce.train_py_flags(flags) == ["--epochs", "1", "--hidden", "32"]


def test_a_missing_interpreter_is_a_parts_error_not_a_traceback(tmp_path):
    with pytest.raises(reproduce.PartError, match="No such file"):
        reproduce.run_command([str(tmp_path / "no-python"), "-V"], log=lambda line: None)


def test_the_papers_table_is_run_on_mnist_only(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- commit -->\n<!-- /commit -->\n")
    options = ["--data-dir", str(tmp_path), "--dataset", "fashion", "--only", "iwae",
               "--torch-python", sys.executable, "--docs", str(tmp_path / "docs"),
               "--readme", str(readme), "--work", str(tmp_path / "work")]
    assert reproduce.main(options) == 0
    assert "iwae: skipped, its paper's table is on MNIST" in capsys.readouterr().out
    assert not (tmp_path / "work").exists()
