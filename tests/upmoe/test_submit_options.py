"""`upmoe submit` / `jobs` without a cluster: token lookup, addresses, job environment and the checks that must
fail before anything is sent (so a typo never becomes a job)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.testlib import free_port, run_cli
from upmoe.jobs import (
    WORKING_DIR_EXCLUDES,
    build_runtime_env,
    job_env_vars,
    prepare_submission,
    resolve_address,
)
from upmoe.ray_auth import auth_failure_message, find_token


def _run(*args: str | Path) -> tuple[int, str, str]:
    result = run_cli(*args)
    return result.rc, result.out, result.err


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME without ~/.ray/auth_token, and no token variables: the token lookup starts from nothing."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_token_lookup_follows_rays_order(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_token() is None
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token().value == "from-home"
    path = home / "token"
    path.write_text("  from-path \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    token = find_token()
    assert (token.value, token.header()) == ("from-path", {"Authorization": "Bearer from-path"})
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token().source == "$RAY_AUTH_TOKEN"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    path.write_text("")
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN_PATH"):  # Ray refuses too, rather than fall back
        find_token()


def test_auth_messages_name_the_fix(home: Path) -> None:
    missing = auth_failure_message("http://h:8265", "Authentication required: Unauthorized", None)
    assert "requires a token" in missing and "RAY_AUTH_TOKEN" in missing and "\n" not in missing
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("stale")
    wrong = auth_failure_message("http://h:8265", "Authentication failed: Forbidden", find_token())
    assert "refused the token" in wrong and str(home / ".ray" / "auth_token") in wrong


def test_address_flag_wins_over_environment() -> None:
    env = {"RAY_ADDRESS": "10.0.0.1:8265", "RAY_API_SERVER_ADDRESS": "http://10.0.0.2:8265/"}
    assert resolve_address("http://head:8265", env) == "http://head:8265"
    assert resolve_address(None, env) == "http://10.0.0.2:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:8265"}) == "http://10.0.0.1:8265"
    assert resolve_address(None, {}) == "http://127.0.0.1:8265"


def test_job_environment_is_explicit() -> None:
    here = {"WANDB_API_KEY": "k", "WANDB_MODE": "", "HF_TOKEN": "h", "OTHER": "o"}
    assert job_env_vars([], here) == {"WANDB_API_KEY": "k"}  # W&B passes through when set; nothing else does
    assert job_env_vars(["HF_TOKEN", "A=1=2", "B="], here) == {
        "WANDB_API_KEY": "k",
        "HF_TOKEN": "h",
        "A": "1=2",
        "B": "",
    }
    with pytest.raises(ValueError, match="MISSING is not set here"):
        job_env_vars(["MISSING"], here)
    with pytest.raises(ValueError, match="NAME or NAME=VALUE"):
        job_env_vars(["=x"], here)


def test_runtime_env_uploads_source_without_venv_or_outputs(tmp_path: Path) -> None:
    env = build_runtime_env(tmp_path, {"A": "1"}, ["rich"])
    assert env["working_dir"] == str(tmp_path.resolve()) and env["pip"] == ["rich"] and env["env_vars"] == {"A": "1"}
    assert {".venv", ".git", "demo_out", "__pycache__"} <= set(env["excludes"]) == set(WORKING_DIR_EXCLUDES)
    assert build_runtime_env(None, {}, []) == {}  # default: the upmoe installed on the cluster
    with pytest.raises(ValueError, match="not a directory"):
        build_runtime_env(tmp_path / "nope", {}, [])


def test_entrypoint_runs_the_clusters_upmoe(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(
        command="eval", args=[str(tmp_path / "my model"), "--json"], env=None, pip=None, working_dir=None
    )
    args.job_id, args.num_cpus = "j1", 0.5
    job = prepare_submission(args)
    assert job["entrypoint"] == f"python -m upmoe.cli eval '{tmp_path / 'my model'}' --json"
    assert (job["submission_id"], job["entrypoint_num_cpus"], job["runtime_env"]) == ("j1", 0.5, {})


def test_train_jobs_get_time_to_checkpoint_when_stopped(tmp_path: Path) -> None:
    """Ray SIGKILLs a stopped job 3 s after its SIGTERM unless told otherwise: a train job gets STOP_WAIT_S."""
    import argparse

    from moe_train.stopping import STOP_WAIT_ENV, STOP_WAIT_S

    def job(command: str, env: list[str] | None = None) -> dict:
        args = argparse.Namespace(command=command, args=[], env=env, pip=None, working_dir=None)
        args.job_id, args.num_cpus = None, None
        return prepare_submission(args)

    assert job("train")["runtime_env"]["env_vars"] == {STOP_WAIT_ENV: str(STOP_WAIT_S)}
    assert job("train", [f"{STOP_WAIT_ENV}=30"])["runtime_env"]["env_vars"] == {STOP_WAIT_ENV: "30"}
    assert "env_vars" not in job("upcycle")["runtime_env"]


def test_mistakes_fail_before_contacting_the_cluster() -> None:
    address = f"http://127.0.0.1:{free_port()}"  # any contact would fail with "cannot reach"
    rc, _, err = _run("submit", "--address", address, "init", "x")
    assert rc == 2 and "invalid choice: 'init'" in err
    rc, _, err = _run("submit", "--address", address, "train", "--no-such-flag")
    assert rc == 2 and "upmoe train: error: unrecognized arguments: --no-such-flag" in err
    rc, _, err = _run("submit", "--address", address, "--env", "SURELY_UNSET_VAR_42", "eval", "m")
    assert rc == 1 and "SURELY_UNSET_VAR_42 is not set here" in err
    rc, _, err = _run("submit", "--address", address, "eval", "m")
    assert rc == 1 and f"cannot reach a Ray dashboard at {address}" in err
    rc, _, err = _run("jobs", "list", "--address", address)
    assert rc == 1 and "cannot reach" in err and len(err.strip().splitlines()) == 1
