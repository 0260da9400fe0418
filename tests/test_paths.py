"""One data root and one results root, each read from its environment variable in one place."""
from __future__ import annotations

from pathlib import Path

from mmpfl_core.paths import DATA_DIR_ENV, RESULTS_DIR_ENV, data_root, results_root


def test_environment_variables_win(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "d"))
    monkeypatch.setenv(RESULTS_DIR_ENV, str(tmp_path / "r"))
    assert data_root() == tmp_path / "d" and (tmp_path / "d").is_dir()
    assert results_root() == tmp_path / "r" and (tmp_path / "r").is_dir()


def test_defaults_are_git_ignored_folders_of_the_checkout(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(RESULTS_DIR_ENV, raising=False)
    repo = Path(__file__).resolve().parent.parent
    assert data_root(create=False) == repo / "data"
    assert results_root(create=False) == repo / "results"
    ignored = (repo / ".gitignore").read_text().split()
    assert "/data/" in ignored and "/results/" in ignored
