"""`upmoe bench train` runs end to end and reports throughput, MFU and the all-to-all share.

Only the EP=2 layout runs here (the all-to-all share is the number that needs two workers); EP=1 is the same
training loop on one worker, run by every other training test.
"""

from __future__ import annotations

import json

import pytest

from upmoe.cli import main


@pytest.mark.slow
def test_train_bench_runs(capsys) -> None:
    argv = ["bench", "train", "--ep", "2", "--steps", "3", "--warmup-steps", "1", "--seq-len", "64"]
    assert main([*argv, "--micro-batch", "2", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["ep"] == row["workers"] == 2
    assert row["tokens_per_s_per_worker"] > 0 and row["mfu"] > 0
    assert 0 < row["all_to_all_share"] < 1


@pytest.mark.parametrize("option", [["--ep", "0"], ["--ep", "1,x"], ["--zero-stages", "3"]])
def test_train_bench_refuses_bad_lists(option: list[str]) -> None:
    with pytest.raises(SystemExit, match=option[0]):
        main(["bench", "train", *option])
