"""``hegate bench hostile --quick`` end to end: one gateway, two attacks, the results files."""

from __future__ import annotations

import json

from bench.hostile import DEFAULT_ATTACKS, _arguments, run


def test_a_quick_run_writes_the_table_and_the_json(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    _arguments(parser)
    args = parser.parse_args(
        ["--quick", "--attacks", "ping-flood:fast", "unauthenticated-bodies:grpc.aio", "--baseline", "none",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert run(args) == 0
    result = json.loads((tmp_path / "hostile.json").read_text())
    assert [(row["attack"], row["port"]) for row in result["attacks"]] == [
        ("ping-flood", "fast"),
        ("unauthenticated-bodies", "grpc.aio"),
    ]
    for row in result["attacks"]:
        assert row["fast_attacked"]["ok"] > 0 and row["grpc.aio_attacked"]["ok"] > 0
        assert row["rss_growth_mib"] >= 0
    assert result["attacks"][0]["attacker"]["goaway ENHANCE_YOUR_CALM"] >= 1
    assert "| ping-flood | fast |" in (tmp_path / "hostile.md").read_text()
    assert {c["figure"].split(":")[0] for c in result["targets"]} >= {"ping-flood on fast"}
    assert len(DEFAULT_ATTACKS) == 16
