"""Every citation of the design notes or the facts file resolves inside the repository.

A citation is the word ``DESIGN`` or ``FACTS`` in capitals, with an optional path and ``.md``
(``docs/DESIGN.md 4.6``, ``DESIGN 4.1-4.4``, ``docs/FACTS.md, "Accounting"``), or any path into a
``../shared`` folder outside the repository. For each one found in a source or documentation file
(Python, Markdown, YAML/TOML, the Makefile, CI scripts, and the cells of every notebook):

* the cited file must exist in the repository: a path is resolved from the repository root or from
  the citing file's folder; a bare ``DESIGN`` / ``FACTS`` without a path names no file and is an
  error, except in a notebook cell, where it reads as ``docs/DESIGN.md`` / ``docs/FACTS.md`` (the
  notebooks' own style);
* every section number it cites (lists ``4.5, 4.6`` and ranges ``4.1-4.4`` included) must be a
  numbered heading of ``docs/DESIGN.md``;
* a facts section it names in quotes must be (part of) a heading of ``docs/FACTS.md``.

This file is the scanner's own source and holds planted bad citations as test data, so it is the one
file the repository scan leaves out.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SELF = Path(__file__).resolve()
SUFFIXES = {".py", ".md", ".ipynb", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh"}
NAMES = {"Makefile", "run"}  # .ci/run

_TOKEN = re.compile(r"(?<![\w./-])(?P<path>(?:[\w.-]+/)*)(?P<name>DESIGN|FACTS)(?P<ext>\.md)?(?!\w)")
_NUMBER = r"\d+(?:\.\d+)?"
_SECTIONS = re.compile(rf"\s+(?:sections?\s+|§\s*)?(?P<list>{_NUMBER}(?:\s*(?:,|and|-|–|to)\s*{_NUMBER})*)")
_TITLE = re.compile(r"(?:,\s*|\s+)(?:section\s+)?[\"“](?P<title>[^\"”\n]+)[\"”]")
_OUTSIDE = re.compile(r"(?:\.\./)+shared\b")
_HEADING_NUMBER = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Problem:
    where: str
    citation: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.citation!r}: {self.why}"


def design_sections(design: Path) -> set[str]:
    """The numbers of the numbered headings of a design file (``## 4. ...`` -> "4", ``### 4.6 ...`` -> "4.6")."""
    return set(_HEADING_NUMBER.findall(design.read_text(encoding="utf-8")))


def facts_headings(facts: Path) -> list[str]:
    return [h.lower() for h in _HEADING.findall(facts.read_text(encoding="utf-8"))]


def cited_numbers(listed: str) -> list[str]:
    """``"4.5, 4.6"`` -> [4.5, 4.6]; ``"4.1-4.4"`` -> [4.1, 4.2, 4.3, 4.4]; a range across majors keeps its ends."""
    out: list[str] = []
    for part in re.split(r"\s*(?:,|and)\s*", listed):
        ends = re.split(r"\s*(?:-|–|to)\s*", part)
        if len(ends) == 2 and "." in ends[0] and "." in ends[1] and ends[0].split(".")[0] == ends[1].split(".")[0]:
            major, lo, hi = ends[0].split(".")[0], int(ends[0].split(".")[1]), int(ends[1].split(".")[1])
            out += [f"{major}.{minor}" for minor in range(lo, hi + 1)] or ends
        else:
            out += ends
    return out


def check_text(text: str, *, where: str, citing_dir: Path, root: Path, notebook: bool) -> list[Problem]:
    """The problems of every citation in ``text`` (one file, or one notebook cell)."""
    problems = [Problem(where, m.group(0), "points outside the repository; cite docs/DESIGN.md or docs/FACTS.md")
                for m in _OUTSIDE.finditer(text)]
    for m in _TOKEN.finditer(text):
        name, token = m.group("name"), m.group(0)
        if m.group("path") or m.group("ext"):
            relative = f"{m.group('path')}{name}{m.group('ext') or '.md'}"
            candidates = [(root / relative).resolve(), (citing_dir / relative).resolve()]
            found = [c for c in candidates if c.is_file() and c.is_relative_to(root.resolve())]
            if not found:
                problems.append(Problem(where, token, f"no file {relative} in the repository"))
                continue
            target = found[0]
        elif notebook:
            target = root / "docs" / f"{name}.md"
            if not target.is_file():
                problems.append(Problem(where, token, f"docs/{name}.md does not exist"))
                continue
        else:
            problems.append(Problem(where, token, f"names no file; write docs/{name}.md"))
            continue
        rest = text[m.end():]
        if name == "DESIGN" and (sections := _SECTIONS.match(rest)):
            known = design_sections(target)
            for number in cited_numbers(sections.group("list")):
                if number not in known:
                    problems.append(Problem(where, token + sections.group(0),
                                            f"section {number} is not a numbered heading of {target.relative_to(root)}"))
        if name == "FACTS" and (title := _TITLE.match(rest)):
            wanted = title.group("title").strip().lower()
            if not any(wanted in heading for heading in facts_headings(target)):
                problems.append(Problem(where, token + title.group(0),
                                        f"no heading of {target.relative_to(root)} contains {wanted!r}"))
    return problems


def check_file(path: Path, root: Path) -> list[Problem]:
    rel = path.relative_to(root).as_posix()
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return [p for i, cell in enumerate(cells)
                for p in check_text("".join(cell["source"]), where=f"{rel} cell {i}", citing_dir=path.parent, root=root,
                                    notebook=True)]
    return check_text(path.read_text(encoding="utf-8", errors="replace"), where=rel, citing_dir=path.parent, root=root,
                      notebook=False)


#: What a copy without git metadata skips, as .gitignore does: top-level outputs and environments, caches anywhere.
SKIPPED_TOP = {".git", ".venv", "build", "dist", "site", "results", "data", ".pytest_cache", ".hypothesis"}
SKIPPED_ANYWHERE = {"__pycache__", ".ipynb_checkpoints"}


def repository_files(root: Path) -> list[Path]:
    """Tracked files and untracked ones git does not ignore (a new file counts before it is committed); in a copy
    without git metadata, every file but those .gitignore would skip (:data:`SKIPPED_TOP`, :data:`SKIPPED_ANYWHERE`)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.splitlines()
        files = [root / f for f in listed]
    except (OSError, subprocess.CalledProcessError):
        files = [f for f in root.rglob("*") if (parts := f.relative_to(root).parts)[0] not in SKIPPED_TOP
                 and not SKIPPED_ANYWHERE & set(parts) and not any(p.endswith(".egg-info") for p in parts)]
    return sorted(f for f in files if f.is_file() and (f.suffix in SUFFIXES or f.name in NAMES) and f.resolve() != SELF)


def scan(root: Path, files: list[Path]) -> list[Problem]:
    return [p for f in files for p in check_file(f, root)]


def test_the_design_notes_and_the_facts_exist_with_the_cited_numbering():
    sections = design_sections(ROOT / "docs" / "DESIGN.md")
    assert {"1", "2", "3", "4", "5", "6"} | {f"4.{i}" for i in range(1, 9)} <= sections
    assert (ROOT / "docs" / "FACTS.md").is_file()


def test_every_citation_in_the_repository_resolves():
    files = repository_files(ROOT)
    assert any(f.suffix == ".ipynb" for f in files) and any(f.name == "dp_strategies.py" for f in files)
    problems = scan(ROOT, files)
    assert not problems, "\n".join(map(str, problems))


def test_the_scan_sees_the_citations_it_checks():
    """The scan is not vacuous: the repository's citations are found (so a bad one would be checked)."""
    found = 0
    for f in repository_files(ROOT):
        text = f.read_text(encoding="utf-8", errors="replace")
        found += len(_TOKEN.findall(text))
    assert found >= 50


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A copy of the docs in a scratch repository root."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("results"))
    return tmp_path


def _notebook(path: Path, markdown: str) -> Path:
    path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "metadata": {}, "source": [markdown]}],
                                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


GOOD = [
    "(docs/DESIGN.md 4.6)", "docs/DESIGN.md 4.1-4.4", "docs/DESIGN.md 4.5 and 4.7", "docs/DESIGN.md section 2",
    "docs/DESIGN.md 4.5, 4.6", "docs/DESIGN.md 6, and later", 'docs/FACTS.md, "Accounting"',
    'docs/FACTS.md "MRI and MS facts"', "docs/FACTS.md", "see [the notes](docs/DESIGN.md)",
]
BAD = [
    ("DESIGN 4.6", "names no file"), ("docs/DESIGN.md 4.9", "section 4.9"), ("docs/DESIGN.md 4.7-4.9", "section 4.9"),
    ("docs/DESIGN.md 7", "section 7"), ("../shared/DESIGN.md", "outside the repository"),
    ("the notes in ../shared", "outside the repository"), ("FACTS: NaN", "names no file"),
    ("DESIGN.md 4.1", "no file DESIGN.md"), ('docs/FACTS.md, "Gradient boosting"', "no heading"),
    ("docs/DESIGNS.md", None),  # not a citation of DESIGN at all: nothing to check
]


@pytest.mark.parametrize("line", GOOD)
def test_a_good_citation_passes(planted: Path, line: str):
    f = planted / "mod.py"
    f.write_text(f'"""Docstring {line}."""\n')
    assert scan(planted, [f]) == []


@pytest.mark.parametrize("line, why", BAD)
def test_a_planted_bad_citation_fails(planted: Path, line: str, why: str | None):
    f = planted / "pkg" / "mod.py"
    f.parent.mkdir()
    f.write_text(f"# {line}\n")
    problems = scan(planted, [f])
    if why is None:
        assert problems == []
    else:
        assert len(problems) >= 1 and why in str(problems[0]), problems


def test_notebooks_may_cite_the_bare_section_form(planted: Path):
    good = _notebook(planted / "good.ipynb", "what stays outside the guarantee (DESIGN 4.6, 4.5)")
    bad = _notebook(planted / "bad.ipynb", "see DESIGN 4.12 and FACTS.md")
    assert scan(planted, [good]) == []
    problems = scan(planted, [bad])
    assert [p.where for p in problems] == ["bad.ipynb cell 0"] * 2, problems
    assert "section 4.12" in str(problems[0]) and "no file FACTS.md" in str(problems[1])


def test_a_missing_design_file_fails_every_citation(planted: Path):
    (planted / "docs" / "DESIGN.md").unlink()
    nb = _notebook(planted / "nb.ipynb", "DESIGN 4.6")
    py = planted / "m.py"
    py.write_text("# docs/DESIGN.md 4.6\n")
    assert len(scan(planted, [nb, py])) == 2


def test_docs_cite_each_other_relative_to_their_folder(planted: Path):
    assert scan(planted, [planted / "docs" / "DESIGN.md", planted / "docs" / "FACTS.md"]) == []


def test_a_copy_without_git_lists_the_same_files(monkeypatch: pytest.MonkeyPatch):
    with_git = repository_files(ROOT)

    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(subprocess, "run", no_git)
    without_git = repository_files(ROOT)
    # Untracked scratch files git ignores (e.g. a local build/) are skipped by both.
    assert set(without_git) >= set(with_git) and len(without_git) - len(with_git) <= 5
