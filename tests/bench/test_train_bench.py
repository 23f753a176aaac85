"""`upmoe bench train` runs EP=1 and EP=2 end to end and reports throughput, MFU and the all-to-all share."""

from __future__ import annotations

import json

import pytest

from upmoe.cli import main


@pytest.mark.slow
def test_train_bench_runs(capsys) -> None:
    argv = ["bench", "train", "--steps", "3", "--warmup-steps", "1", "--seq-len", "64", "--micro-batch", "2"]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["ep"] for r in rows] == [1, 2]
    assert all(r["tokens_per_s_per_worker"] > 0 and r["mfu"] > 0 for r in rows)
    assert rows[0]["all_to_all_share"] == 0 and 0 < rows[1]["all_to_all_share"] < 1
