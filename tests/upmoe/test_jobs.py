"""Ray jobs end to end on a real 2-node cluster with token authentication (`upmoe cluster up --nodes 1`).

One cluster for the module: a head and one worker raylet, 1 CPU each, so a 2-worker Ray Train run can only fit
by putting one worker on each node. Jobs go through `upmoe submit` exactly as a user's would (the Job Submission
SDK over HTTP with the token); the assertions then read the cluster's own records (job info, the state API's
actors and nodes) rather than anything the tested code reports about itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.testlib import CliResult, free_port, run_cli

# The SDK's own log follower trips aiohttp's deprecation of ssl=None; nothing upmoe passes.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")]

ROOT = Path(__file__).resolve().parents[2]
UPCYCLE_SHAPE = ["--num-experts", "8", "--num-shared-experts", "1", "--top-k", "2", "--expert-size", "32"]
TRAIN_ARGS = ["--data", "embedded", "--workers", "2", "--ep", "2", "--seq-len", "64", "--micro-batch", "2"]
TRAIN_QUIET = ["--wandb-mode", "disabled", "--heatmap-every", "0"]
CLIENT_ENV_UNSET = ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "WANDB_API_KEY")


@dataclass(frozen=True)
class Cluster:
    temp_dir: Path
    address: str  # dashboard / job API
    token: str

    def api(self, path: str) -> Any:
        """The cluster's own HTTP API with the right token: the ground truth the tests compare against."""
        r = requests.get(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"}, timeout=30)
        r.raise_for_status()
        return r.json()

    def submission_ids(self) -> set[str]:
        return {j["submission_id"] for j in self.api("/api/jobs/") if j.get("submission_id")}


def _sigint_blocked(pid: int | str = "self") -> bool:
    """Whether SIGINT is in the process's blocked-signal mask (``SigBlk`` in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    return False


def _as_from_a_shell() -> None:
    """A child as a terminal starts it: SIGINT unblocked and handled by default. Both are inherited: Ray blocks
    SIGINT in the processes it starts, and a shell ignores it in anything it starts with `&` (a suite run as a
    background job would otherwise hand an ignored SIGINT to the client)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def upmoe_process(*args: str | Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "upmoe.cli", *map(str, args)]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # SIGABRT prints every thread's stack (see _stacks_of)
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_as_from_a_shell
    )


def _stacks_of(proc: subprocess.Popen) -> str:
    """A hung client's thread stacks, for the failure message."""
    proc.send_signal(signal.SIGABRT)
    try:
        return proc.communicate(timeout=30)[1][-6000:]
    except subprocess.TimeoutExpired:
        return "(no stacks)"


def processes_naming(path: Path) -> list[str]:
    needle = f"{path}{os.sep}"
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if needle in cmdline or f"--temp-dir {path}" in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline[:160]}")
    return found


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """`upmoe cluster up --nodes 1` for the module, and `cluster down` whatever happens, checking nothing is left.

    The temp dir is short (Ray puts Unix sockets under it) and private, so nothing else on the machine attaches.
    While the module runs, the environment is what `cluster up` tells users to export, and nothing from the
    outer environment (another address or token, a W&B key) leaks into the jobs.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="upmoe-jobs-"))
    dashboard = free_port()
    cmd = ["cluster", "up", "--nodes", "1", "--temp-dir", temp_dir, "--head-port", free_port()]
    up = upmoe_process(*cmd, "--dashboard-port", dashboard)
    failed_before = request.session.testsfailed
    try:
        out, err = up.communicate(timeout=180)
        assert up.returncode == 0, f"cluster up failed:\n{out}\n{err}"
        assert f"export RAY_API_SERVER_ADDRESS=http://127.0.0.1:{dashboard}" in out
        token_line = next(line for line in out.splitlines() if "export RAY_AUTH_TOKEN=" in line)
        token_file = Path(token_line.split("$(cat ", 1)[1].rstrip(")"))
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RAY_AUTH_TOKEN", token_file.read_text().strip())
            for name in CLIENT_ENV_UNSET:
                env.delenv(name, raising=False)
            yield Cluster(temp_dir, f"http://127.0.0.1:{dashboard}", token_file.read_text().strip())
    finally:
        up.kill()
        down = upmoe_process("cluster", "down", "--temp-dir", temp_dir)
        down_out, down_err = down.communicate(timeout=120)
        leftovers = processes_naming(temp_dir)
        if request.session.testsfailed == failed_before:
            shutil.rmtree(temp_dir, ignore_errors=True)  # kept after a failure: the Ray logs are in it
        assert down.returncode == 0, down_err
        assert "stopped the local Ray cluster" in down_out
        assert not leftovers, leftovers


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jobs")
    assert run_cli("init", root / "dense", "--preset", "debug", "--seed", "1").rc == 0
    return root


@pytest.fixture(scope="module")
def upcycled(cluster: Cluster, models: Path) -> tuple[CliResult, Path]:
    """`upmoe submit upcycle` once for the module (train and serve start from its output)."""
    dst = models / "moe"
    result = run_cli(
        "submit", "--address", cluster.address, "upcycle", models / "dense", dst, *UPCYCLE_SHAPE, "--no-progress"
    )
    return result, dst


def _job_id(out: str) -> str:
    return next(line.split()[2].rstrip(":") for line in out.splitlines() if line.startswith("submitted job "))


def test_cluster_has_two_nodes_with_token_auth_and_refuses_a_second_up(cluster: Cluster) -> None:
    nodes = cluster.api("/api/v0/nodes?detail=1")["data"]["result"]["result"]
    resources = sorted(r for n in nodes if n["state"] == "ALIVE" for r in n["resources_total"] if "upmoe_node" in r)
    assert resources == ["upmoe_node_0", "upmoe_node_1"]
    assert all(n["resources_total"]["CPU"] == 1 for n in nodes)
    assert requests.get(f"{cluster.address}/api/jobs/", timeout=10).status_code == 401  # token auth is on
    again = run_cli("cluster", "up", "--nodes", "1", "--temp-dir", cluster.temp_dir)
    assert again.rc == 1 and "already up" in again.err and "cluster down" in again.err


def test_submit_upcycle_succeeds(cluster: Cluster, upcycled: tuple[CliResult, Path]) -> None:
    result, dst = upcycled
    assert result.rc == 0, result.err[-3000:]
    job_id = _job_id(result.out)
    assert f"dashboard: {cluster.address}/#/jobs/{job_id}" in result.out
    assert "wrote " in result.out  # the job's own output, followed live
    assert f"job {job_id} SUCCEEDED" in result.out
    assert json.loads((dst / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert cluster.api(f"/api/jobs/{job_id}")["status"] == "SUCCEEDED"


def test_wrong_or_missing_token_is_refused_clearly_and_creates_no_job(
    cluster: Cluster, models: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = cluster.submission_ids()
    argv = ["submit", "--address", cluster.address, "upcycle", models / "dense", tmp_path / "never", *UPCYCLE_SHAPE]
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    wrong = run_cli(*argv)
    assert wrong.rc == 1
    assert wrong.err.strip() == (
        f"upmoe submit: error: the Ray cluster at {cluster.address} refused the token from $RAY_AUTH_TOKEN: it is "
        "not this cluster's token (on the head node `ray get-auth-token` prints the right one)"
    )
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    missing = run_cli(*argv)
    assert missing.rc == 1 and len(missing.err.strip().splitlines()) == 1
    assert f"the Ray cluster at {cluster.address} requires a token: set $RAY_AUTH_TOKEN" in missing.err
    assert cluster.submission_ids() == before
    assert not (tmp_path / "never").exists()


def test_submit_train_ep2_spans_both_nodes(cluster: Cluster, upcycled: tuple[CliResult, Path], models: Path) -> None:
    run = models / "run"
    argv = ["--model", upcycled[1], "--out", run, "--steps", "3", *TRAIN_ARGS, *TRAIN_QUIET]
    result = run_cli("submit", "--address", cluster.address, "train", *argv)
    assert result.rc == 0, result.out[-3000:] + result.err[-3000:]
    job_id = _job_id(result.out)
    assert "trained 3 steps" in result.out and f"job {job_id} SUCCEEDED" in result.out
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # Where the two Ray Train workers ran, from the GCS's actor table (dead actors stay listed) and node table.
    ray_job = cluster.api(f"/api/jobs/{job_id}")["job_id"]
    actors = cluster.api("/api/v0/actors?detail=1&limit=10000")["data"]["result"]["result"]
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker" and a["job_id"] == ray_job]
    nodes = cluster.api("/api/v0/nodes?detail=1")["data"]["result"]["result"]
    node_name = {n["node_id"]: next(r for r in n["resources_total"] if r.startswith("upmoe_node_")) for n in nodes}
    assert len(workers) == 2
    assert sorted(node_name[w["node_id"]] for w in workers) == ["upmoe_node_0", "upmoe_node_1"]


def test_jobs_list_status_logs(cluster: Cluster) -> None:
    listing = run_cli("jobs", "list", "--address", cluster.address)
    assert listing.rc == 0
    header, *rows = listing.out.strip().splitlines()
    assert header.split() == ["JOB", "STATUS", "STARTED", "DURATION", "ENTRYPOINT"]
    train = next(r for r in rows if "upmoe train" in r)
    assert any("upmoe upcycle" in r and "SUCCEEDED" in r for r in rows) and "SUCCEEDED" in train
    job_id = train.split()[0]
    status = run_cli("jobs", "status", job_id, "--address", cluster.address)
    assert status.rc == 0 and "status:     SUCCEEDED" in status.out and "python -m upmoe.cli train" in status.out
    logs = run_cli("jobs", "logs", job_id, "--address", cluster.address)
    assert logs.rc == 0 and "trained 3 steps" in logs.out
    missing = run_cli("jobs", "status", "raysubmit_nope", "--address", cluster.address)
    assert missing.rc == 1 and "does not exist" in missing.err


def test_submit_with_working_dir_and_env(cluster: Cluster, models: Path) -> None:
    """The source tree is uploaded as the job's working dir (without .venv, .git, outputs: it stays ~1 MB)."""
    argv = ["--working-dir", ROOT, "--env", "UPMOE_PROBE=42", "eval", models / "dense", "--seq-len", "64"]
    result = run_cli("submit", "--address", cluster.address, *argv, "--max-tokens", "512", "--json")
    assert result.rc == 0, result.out[-3000:] + result.err[-3000:]
    info = cluster.api(f"/api/jobs/{_job_id(result.out)}")
    assert info["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")
    assert info["runtime_env"]["env_vars"] == {"UPMOE_PROBE": "42"}
    summary = next(json.loads(line) for line in result.out.splitlines() if line.startswith('{"loss"'))
    assert summary["tokens"] == 512


def test_ctrl_c_leaves_the_job_running_and_jobs_stop_stops_it(
    cluster: Cluster, upcycled: tuple[CliResult, Path], models: Path
) -> None:
    argv = ["--model", upcycled[1], "--out", models / "long", "--steps", "100000", *TRAIN_ARGS, *TRAIN_QUIET]
    proc = upmoe_process("submit", "--address", cluster.address, "--job-id", "upmoe-ctrl-c", "train", *argv)
    try:
        _ctrl_c_then_stop(cluster, proc)
    finally:  # a failure must not leave a 100,000-step job holding the cluster's CPUs for the next tests
        if cluster.api("/api/jobs/upmoe-ctrl-c")["status"] in ("PENDING", "RUNNING"):
            run_cli("jobs", "stop", "upmoe-ctrl-c", "--address", cluster.address)


def _ctrl_c_then_stop(cluster: Cluster, proc: subprocess.Popen) -> None:
    try:
        assert proc.stdout.readline().startswith("submitted job upmoe-ctrl-c")
        deadline = time.monotonic() + 60
        while cluster.api("/api/jobs/upmoe-ctrl-c")["status"] != "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _sigint_blocked(proc.pid), f"SIGINT blocked in the client (here: {_sigint_blocked()})"
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)  # generous: a loaded CI machine
        except subprocess.TimeoutExpired:
            pytest.fail(f"upmoe submit ignored Ctrl-C for 120 s; its threads:\n{_stacks_of(proc)}")
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "job upmoe-ctrl-c keeps running" in err and "upmoe jobs stop upmoe-ctrl-c" in err
    assert cluster.api("/api/jobs/upmoe-ctrl-c")["status"] == "RUNNING"
    stopped = run_cli("jobs", "stop", "upmoe-ctrl-c", "--address", cluster.address)
    assert stopped.rc == 0 and "job upmoe-ctrl-c STOPPED" in stopped.out
    assert cluster.api("/api/jobs/upmoe-ctrl-c")["status"] == "STOPPED"


def test_submit_serve_answers_then_stops(cluster: Cluster, upcycled: tuple[CliResult, Path]) -> None:
    port = free_port()
    argv = ["--no-wait", "--job-id", "upmoe-serve", "serve", upcycled[1], "--ep", "2", "--port", str(port)]
    submitted = run_cli("submit", "--address", cluster.address, *argv)
    assert submitted.rc == 0, submitted.err
    assert "upmoe jobs logs upmoe-serve --follow" in submitted.out
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while not _healthy(url):
            status = cluster.api("/api/jobs/upmoe-serve")
            assert status["status"] in ("PENDING", "RUNNING"), status.get("message")
            assert time.monotonic() < deadline, "no healthy endpoint after 180 s"
            time.sleep(1)
        body = {"model": "moe", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        stopped = run_cli("jobs", "stop", "upmoe-serve", "--address", cluster.address)
    assert stopped.rc == 0 and "STOPPED" in stopped.out


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False
