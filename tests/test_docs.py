"""The documentation: a short README, links that resolve inside the repo, a current benchmark table, a licence."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import typer

from octssl.cli import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: the markdown a reader is sent to: the landing page, the manuals and the benchmark write-ups
DOCS = [README, *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "benchmarks").glob("*.md"))]
#: files that live outside the repository; no document may name them
FOREIGN = ("PAPER.md", "DESIGN.md", "STACK.md", "../shared")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The text without code blocks and inline code, where `[a](b)` is code rather than a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """The heading anchors of a markdown file, as GitHub makes them (lower case, punctuation dropped)."""
    out = set()
    for line in prose(path.read_text()).splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            out.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return out


def markdown_files() -> list[Path]:
    """Every markdown file of the checkout (not hidden folders, virtual environments or run outputs)."""
    skip = {"runs", "build", "dist", "node_modules"}
    return sorted(p for p in REPO.rglob("*.md")
                  if not any(part.startswith(".") or part in skip for part in p.relative_to(REPO).parts[:-1]))


def test_readme_is_a_landing_page_of_at_most_12_kb() -> None:
    size = README.stat().st_size
    assert size <= 12 * 1024, f"README.md is {size} bytes; move detail into docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_to_a_file_in_the_repo(doc: Path) -> None:
    problems = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.is_relative_to(REPO):
            problems.append(f"{target}: outside the repository")
        elif not path.is_file():
            problems.append(f"{target}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            problems.append(f"{target}: {path.relative_to(REPO)} has no heading #{fragment}")
    assert not problems, f"{doc.relative_to(REPO)}: " + "; ".join(problems)


def test_no_markdown_file_names_a_file_outside_the_repo() -> None:
    found = [f"{p.relative_to(REPO)}: {name}" for p in markdown_files() for name in FOREIGN if name in p.read_text()]
    assert len(markdown_files()) >= len(DOCS)
    assert not found, "write what the reader needs in docs/ instead: " + ", ".join(found)


def test_readme_links_every_manual_in_docs() -> None:
    readme = README.read_text()
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if f"(docs/{p.name})" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_readme_command_table_lists_every_octssl_command() -> None:
    cli = typer.main.get_command(app)
    table = README.read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    patterns = {name: rf"`octssl {name}\b" for name, command in cli.commands.items() if not hasattr(command, "commands")}
    patterns |= {f"{group} {sub}": rf"`octssl {group} [^`]*\b{sub}\b"
                 for group, command in cli.commands.items() for sub in getattr(command, "commands", {})}
    missing = [name for name, pattern in patterns.items() if not re.search(pattern, table)]
    assert len(patterns) >= 12 and not missing, f"README's command table lacks {missing}"


def test_benchmark_table_is_generated_from_the_results() -> None:
    spec = importlib.util.spec_from_file_location("benchmarks_table", REPO / "benchmarks" / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    readme = table.README.read_text()
    rows = table.table()
    assert len(rows.splitlines()) == 2 + sum(1 for _ in table.RESULTS.glob("*.json")
                                              if not _.name.startswith("suite-"))
    assert table.with_table(readme, rows) == readme, "run `python benchmarks/table.py` and commit benchmarks/README.md"


def test_licence_file_matches_pyproject_and_the_build_backend_reads_it() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert all((REPO / name).is_file() for name in project["project"].get("license-files", []))
    floor = next(r for r in project["build-system"]["requires"] if r.startswith("setuptools"))
    assert tuple(int(x) for x in re.search(r">=\s*([\d.]+)", floor).group(1).split(".")) >= (77,)


def test_the_readme_gets_a_first_day_user_from_make_to_an_ingested_corpus() -> None:
    """Issue 26.10: how to run octssl after `make`, the key ingest needs, the whole ingest row, docs/predict.md."""
    text = README.read_text()
    first_day = text.split("## Your own scans, first day")[1].split("\n## ")[0]
    for needed in (".venv/bin/octssl", "OCTSSL_PSEUDONYM_KEY", "--ephemeral-key", "--pairs", "--map", "heyex",
                   ".eye"):
        assert needed in first_day, f"the first-day section does not mention {needed}"
    row = next(line for line in text.splitlines() if line.startswith("| corpus | `octssl ingest"))
    for option in ("--pairs", "--map", "--ephemeral-key", "HEYEX XML", "`.eye`", "OCTSSL_PSEUDONYM_KEY"):
        assert option in row, f"the ingest row lacks {option}"
    table = text.split("## Documentation")[1]
    assert "[docs/predict.md](docs/predict.md)" in table
