"""Autoscaling on the model deployment: load raises the replica count from 1 to 2, idleness brings it back to 1,
and every request during the test succeeds."""

from __future__ import annotations

import time
from pathlib import Path

from serve_testlib import BackgroundLoad, running_endpoint

MODEL = "tiny-moe"


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["upmoe"].deployments["ModelServer"]
    return deployment.replica_states.get("RUNNING", 0)


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_load_scales_out_and_idleness_scales_back(serve_port, moe_dir: Path):
    options = {
        "model_dir": str(moe_dir),
        "model_name": MODEL,
        "max_seq_len": 128,
        "max_batch_size": 4,
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 1,
        "downscale_delay_s": 4,
    }
    with running_endpoint(serve_port, options) as url:
        assert _running_replicas() == 1
        body = {"model": MODEL, "prompt": "scale me", "max_tokens": 48}
        with BackgroundLoad(url, body, clients=6) as load:
            scaled_out = _wait_for(lambda: _running_replicas() >= 2, timeout_s=90)
        assert scaled_out, "6 concurrent clients with target_ongoing_requests=1 did not add a replica in 90 s"
        assert _wait_for(lambda: _running_replicas() == 1, timeout_s=90), "did not scale back to 1 replica"
    assert load.codes and set(load.codes) == {200}, load.codes
