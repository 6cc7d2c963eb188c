"""Every measured figure in the README comes from a results file in ``bench/results/``.

A figure typed by hand goes stale the day the benchmark is re-run, and a reader cannot
regenerate it. So each decimal or percentage in the README must appear in a results file: in
one the same section cites (``bench/results/NAME.md``), or, in a section that cites none, in
any of them. The date beside a citation must be that results file's date. Integers (cores,
bits, layer widths, ports) are configuration, not measurements, and are not checked; neither is
anything written as code (`torch 2.13`, `C = 0.1`): settings and versions, not figures.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"

CITATION = re.compile(r"bench/results/([a-z0-9_-]+)\.(?:md|json)")
DATED_CITATION = re.compile(r"bench/results/([a-z0-9_-]+)\.md`?, (\d{4}-\d{2}-\d{2})")
# a decimal (0.27, 97.80%, 16,100.5) or a thousands-separated count (16,968), possibly signed
FIGURE = re.compile(r"(?<![\w.])[+-]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)%?(?![\w.])")
CODE_SPAN = re.compile(r"`[^`]*`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _sections() -> list[tuple[str, str]]:
    """``(heading, body)`` for each ``##`` section, code blocks and code spans removed."""
    text = FENCE.sub("", README.read_text())
    parts = re.split(r"^(## .*)$", text, flags=re.M)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def _results_text(name: str) -> str:
    texts = [p.read_text() for p in (RESULTS / f"{name}.md", RESULTS / f"{name}.json") if p.exists()]
    assert texts, f"the README cites bench/results/{name}, which does not exist"
    joined = "\n".join(texts)
    return joined + "\n" + joined.replace(",", "")


def _all_results() -> str:
    return "\n".join(_results_text(p.stem) for p in sorted(RESULTS.glob("*.md")))


def _appears(figure: str, text: str) -> bool:
    bare = figure.lstrip("+")
    candidates = {bare, bare.replace(",", "")}
    if bare.endswith("%"):  # 97.80% may stand as 0.978 in the JSON
        number = bare[:-1].replace(",", "")
        candidates.add(repr(round(float(number) / 100, 6)))
    return any(re.search(rf"(?<![\d.]){re.escape(c)}(?![\d])", text) for c in candidates)


@pytest.mark.parametrize(("heading", "body"), _sections(), ids=[h for h, _ in _sections()])
def test_every_figure_of_a_section_is_in_a_results_file(heading, body):
    cited = sorted(set(CITATION.findall(body)))
    text = "\n".join(_results_text(name) for name in cited) if cited else _all_results()
    prose = CODE_SPAN.sub("", body)
    missing = [figure for figure in FIGURE.findall(prose) if not _appears(figure, text)]
    sources = ", ".join(f"bench/results/{name}" for name in cited) or "any results file"
    assert not missing, f"{heading}: figures in no results file ({sources}): {missing}"


def test_every_dated_citation_names_its_results_files_date():
    for name, date in DATED_CITATION.findall(README.read_text()):
        header = "\n".join((RESULTS / f"{name}.md").read_text().splitlines()[:6])  # command, date, machine
        assert date in header, f"bench/results/{name}.md was not written on {date}"
