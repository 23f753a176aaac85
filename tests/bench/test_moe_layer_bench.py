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


@pytest.mark.slow
def test_moe_layer_bench_times_the_packed_inference_experts(capsys):
    pytest.importorskip("transformers")
    argv = ["bench", "moe-layer", "--hidden", "64", "--expert-size", "32", "--experts", "8", "--top-k", "2"]
    assert (
        main([*argv, "--shared", "2", "--tokens", "16", "--repeats", "1", "--dtype", "bf16", "--packed", "--json"]) == 0
    )
    rows = {r["impl"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])}
    assert "upmoe packed, oneDNN" in rows
    for name in ("upmoe packed, oneDNN", "upmoe packed, experts kernel"):
        if name in rows:  # the kernel only where AVX512-BF16 and a compiler are
            assert rows[name]["train_tok_s"] is None and rows[name]["forward_tok_s"] > 0
            # bf16 against transformers' bf16 eager block: a few bf16 steps of outputs of magnitude ~0.1
            assert rows[name]["max_abs_diff"] < 2e-2
