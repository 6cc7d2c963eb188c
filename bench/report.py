"""What every benchmark writes beside its figures: the command, the date, the machine.

Each script puts :func:`provenance` at the top of its result and hands the result to
:func:`write`, which stores ``bench/results/<name>.json`` and ``<name>.md`` and prints the table.
"""

from __future__ import annotations

import datetime
import json
import operator
import os
import shlex
import sys
from pathlib import Path

from models.machine import machine_description

RESULTS = Path(__file__).resolve().parent / "results"
COMPARISONS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def provenance(module: str) -> dict[str, str]:
    """The exact command (``hegate <args>`` or ``python -m <module> <args>``), the UTC date, the
    machine, and how busy it was when the command started (the 1-minute load average: other
    people's processes share the cores, and every timing depends on them)."""
    program = ["hegate"] if Path(sys.argv[0]).name == "hegate" else ["python", "-m", module]
    return {
        "command": shlex.join([*program, *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "load_average": f"{os.getloadavg()[0]:.2f}",
    }


def write(name: str, result: dict, markdown: str, directory: Path = RESULTS) -> None:
    """Store the result as JSON and Markdown in ``directory`` and print the Markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (directory / f"{name}.md").write_text(markdown)
    print(markdown)


def target_row(*, figure: str, value: float | None, op: str, target: float, rests_on: str) -> dict:
    """One row of a results file's target table. ``met`` is None when the figure was not measured
    (``value`` None; ``rests_on`` then says why), so a skipped part never reads as a target met.

    Raises:
        KeyError: an unknown comparison (one of ``<=``, ``>=``, ``<``, ``>``).
    """
    compare = COMPARISONS[op]
    return {
        "figure": figure,
        "value": value,
        "target": f"{op} {target:g}",
        "met": None if value is None else bool(compare(value, target)),
        "rests_on": rests_on,
    }
