"""An EP=2 replica (a gang of two ranks sharing a gloo group) serves the same greedy tokens as EP=1, and a killed
rank gets the whole replica replaced while requests keep being answered."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from serve_testlib import BackgroundLoad, running_endpoint

MODEL = "tiny-moe"
PROMPTS = ["Once upon a time", "The quick brown fox", "In the beginning", "A B C D E F", "x"]


def _options(moe_dir: Path, ep: int) -> dict:
    return {"model_dir": str(moe_dir), "model_name": MODEL, "ep": ep, "max_seq_len": 128, "max_batch_size": 8}


def _greedy(url: str) -> list[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = pool.map(
            lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=32, temperature=0), PROMPTS
        )
        return [r.choices[0].text for r in replies]


def _alive_actors(class_name: str) -> list[dict]:
    """Live actors of a class, from the GCS this driver is connected to (no dashboard needed)."""
    from ray._private import state

    return [a for a in state.actors().values() if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]


def test_ep2_replica_gives_the_same_greedy_text_as_ep1(serve_port, moe_dir):
    with running_endpoint(serve_port, _options(moe_dir, 1)) as url:
        ep1 = _greedy(url)
    with running_endpoint(serve_port, _options(moe_dir, 2)) as url:
        ep2 = _greedy(url)
        assert len(_alive_actors("RankWorker")) == 1  # rank 0 is the replica itself
    assert ep2 == ep1
    assert all(ep1)


def test_killing_a_rank_replaces_the_replica_and_service_continues(serve_port, moe_dir):
    with running_endpoint(serve_port, _options(moe_dir, 2)) as url:
        (victim,) = _alive_actors("RankWorker")
        (old_replica,) = _alive_actors("ServeReplica:upmoe:ModelServer")
        body = {"model": MODEL, "prompt": "keep going", "max_tokens": 24}
        with BackgroundLoad(url, body, clients=4) as load:
            time.sleep(3)
            served_before = len(load.codes)
            os.kill(victim["Pid"], signal.SIGKILL)  # the rank's process dies mid-decode
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                replicas = _alive_actors("ServeReplica:upmoe:ModelServer")
                if replicas and replicas[0]["ActorID"] != old_replica["ActorID"] and _alive_actors("RankWorker"):
                    break
                time.sleep(1)
            else:
                pytest.fail("the replica with the dead rank was not replaced within 120 s")
            recovered_at = len(load.codes)
            time.sleep(5)
    outcomes = load.codes
    counts = {code: outcomes.count(code) for code in sorted(set(outcomes))}
    print(f"requests before the kill: {served_before}, before recovery: {recovered_at}, by status: {counts}")
    assert served_before > 0
    after_recovery = outcomes[recovered_at:]
    assert after_recovery and set(after_recovery) == {200}, outcomes
    # Requests in flight when the rank died were retried on the new replica (no token had been sent yet)
    # or, if the retry window ran out, answered 503 — never hung, never a 500.
    assert set(outcomes) <= {200, 503}, outcomes
