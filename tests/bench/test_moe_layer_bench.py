"""The moe-layer benchmark runs end to end (tiny shape) and prints its ratio table."""

from __future__ import annotations

import json

import pytest

from upmoe.cli import main


@pytest.mark.slow
def test_moe_layer_bench_runs(capsys):
    pytest.importorskip("transformers")
    argv = ["bench", "moe-layer", "--hidden", "64", "--expert-size", "32", "--experts", "8", "--top-k", "2"]
    assert main([*argv, "--shared", "2", "--tokens", "16", "--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert "fwd vs best HF" in out
    rows = json.loads(out.strip().splitlines()[-1])
    impls = {r["impl"] for r in rows}
    assert {"upmoe grouped", "upmoe eager", "transformers eager"} <= impls
    assert all(r["max_abs_diff"] < 1e-5 for r in rows)
