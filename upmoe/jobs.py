"""``upmoe submit`` and ``upmoe jobs``: run upmoe commands as Ray jobs on a cluster, through the Job Submission SDK.

A job's entrypoint is ``python -m upmoe.cli COMMAND ARGS``, resolved on the cluster: ``python`` is the cluster's
interpreter (the image's on a real cluster, where upmoe is installed; the one that started the raylets on an
``upmoe cluster up`` cluster, which puts it first on the nodes' PATH), and ``-m`` puts the job's working
directory first on sys.path, so with ``--working-dir`` the uploaded source wins over an installed copy.

Two Ray SDK behaviours are worked around here rather than left to surprise users:
- ``JobSubmissionClient`` lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override an explicit address; we resolve
  the address ourselves (flag, then those variables, then the local default) and hide them while connecting.
- it sends the auth token only when this process runs with RAY_AUTH_MODE=token; we always send the token we
  find (see upmoe.ray_auth) and turn Ray's multi-paragraph AuthenticationError into one line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from upmoe.ray_auth import Token, auth_failure_message, find_token

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# upmoe commands that make sense as cluster jobs (init/demo/bench are local tools; submit/jobs/cluster are clients).
JOB_COMMANDS = ("upcycle", "train", "export", "eval", "serve")
PASSTHROUGH_ENV = ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_MODE")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's own precedence
# Never worth uploading with --working-dir: environments, VCS data, caches, demo and tracking outputs.
WORKING_DIR_EXCLUDES = [
    ".venv",
    "venv",
    ".git",
    "demo_out",
    "wandb",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
]
ENTRYPOINT_PREFIX = ["python", "-m", "upmoe.cli"]


# --------------------------------------------------------------------------------------------------- CLI


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="Ray dashboard (job API) address "
        f"(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else {DEFAULT_ADDRESS})",
    )


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "submit":
        _configure_submit(parser)
    else:
        _configure_jobs(parser)


def _configure_submit(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run `upmoe COMMAND ARGS...` as a Ray job on a cluster: print the job id and dashboard URL, follow the "
        "logs until the job ends, exit 0 if it SUCCEEDED, 1 otherwise. Ctrl-C stops following, not the job. "
        "Paths in ARGS are read on the cluster: use paths every node sees (a shared filesystem). The token for "
        "clusters with token authentication comes from $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or "
        "~/.ray/auth_token."
    )
    p.epilog = (
        f"environment: {', '.join(PASSTHROUGH_ENV)} are passed to the job when set here; anything else only "
        "with --env. Values end up in the job's runtime_env, visible on the dashboard to token holders."
    )
    _add_address(p)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    p.add_argument(
        "--working-dir",
        type=Path,
        help="upload this directory (e.g. the upmoe source tree) as the job's working dir; default: run the "
        f"upmoe installed on the cluster. Excluded: {' '.join(WORKING_DIR_EXCLUDES)}",
    )
    p.add_argument(
        "--env",
        action="append",
        metavar="NAME[=VALUE]",
        help="set a variable in the job: NAME copies it from this environment (error if unset); repeatable",
    )
    p.add_argument("--pip", action="append", metavar="PKG", help="extra pip package for the job; repeatable")
    p.add_argument("--num-cpus", type=float, help="CPUs reserved for the job's driver process (default 0)")
    p.add_argument("--job-id", help="submission id (default: generated); must be unused on the cluster")
    p.add_argument("command", choices=JOB_COMMANDS, metavar="COMMAND", help=f"one of: {', '.join(JOB_COMMANDS)}")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the command's own arguments")


def _configure_jobs(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{list,status,logs,stop}")
    _add_address(sub.add_parser("list", help="one line per job: id, status, start, duration, entrypoint"))
    for action, text in (
        ("status", "a job's status, message and timing"),
        ("logs", "a job's driver output"),
        ("stop", "stop a job and wait until it has stopped"),
    ):
        q = sub.add_parser(action, help=text)
        q.add_argument("job_id", metavar="JOB_ID", help="submission id (raysubmit_...) or job id")
        _add_address(q)
        if action == "logs":
            q.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")


def run(name: str, args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    if name == "submit":
        job = prepare_submission(args)  # all local checks before any network traffic
        with ray_errors(address) as token:
            return submit(connect(address, token), address, job, wait=not args.no_wait)
    with ray_errors(address) as token:
        client = connect(address, token)
        if args.action == "list":
            return list_jobs(client)
        if args.action == "status":
            return show_status(client, args.job_id)
        if args.action == "logs":
            return follow(client, address, args.job_id) if args.follow else show_logs(client, args.job_id)
        return stop(client, args.job_id)


# --------------------------------------------------------------------------------------------------- connection


def resolve_address(flag: str | None, environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    address = flag or next((env[k] for k in ADDRESS_ENV if env.get(k)), DEFAULT_ADDRESS)
    address = address.rstrip("/")
    return address if "://" in address else f"http://{address}"


@contextmanager
def _hidden_env(names: tuple[str, ...]) -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextmanager
def ray_errors(address: str) -> Iterator[Token | None]:
    """Find the token and turn the SDK's auth and connection failures into one-line errors the CLI prints."""
    import requests
    from ray.exceptions import AuthenticationError

    token = find_token()
    try:
        yield token
    except AuthenticationError as e:
        raise RuntimeError(auth_failure_message(address, e.message, token)) from None
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise ConnectionError(
            f"cannot reach a Ray dashboard at {address}: is the cluster up, and is this its dashboard (job API) "
            "address (port 8265 by default, not the GCS port)?"
        ) from None


def connect(address: str, token: Token | None) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    # The SDK logs "WebSocket closed ..." at INFO when a followed job ends: noise between the logs and our summary.
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    with _hidden_env(ADDRESS_ENV):
        return JobSubmissionClient(address, headers=token.header() if token else None)


# --------------------------------------------------------------------------------------------------- submit


def prepare_submission(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the command line here and build submit_job's arguments, so mistakes fail before the cluster."""
    _check_command_args(args.command, args.args)
    env_vars = job_env_vars(args.env or [])
    if args.command == "train":
        from moe_train.stopping import STOP_WAIT_ENV, STOP_WAIT_S

        # `jobs stop` sends SIGTERM, then Ray SIGKILLs after this wait (3 s by default): give the run time to finish
        # its step and write the checkpoint (moe_train.stopping).
        env_vars.setdefault(STOP_WAIT_ENV, str(STOP_WAIT_S))
    runtime_env = build_runtime_env(args.working_dir, env_vars, args.pip or [])
    return {
        "entrypoint": shlex.join([*ENTRYPOINT_PREFIX, args.command, *args.args]),
        "runtime_env": runtime_env,
        "submission_id": args.job_id,
        "entrypoint_num_cpus": args.num_cpus,
        "metadata": {"upmoe_command": args.command},
    }


def _check_command_args(command: str, argv: list[str]) -> None:
    """Parse ARGS with the command's own parser: a typo fails here with that parser's usage, not minutes later."""
    from upmoe.cli import build_parser

    _, parser = build_parser(command)
    parser.parse_args(argv)  # SystemExit(2) with usage on a bad flag; --help prints the command's help


def job_env_vars(specs: list[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The job's environment variables: W&B settings that are set here, plus each --env NAME / NAME=VALUE."""
    env = os.environ if environ is None else environ
    out = {k: env[k] for k in PASSTHROUGH_ENV if env.get(k)}
    for spec in specs:
        name, has_value, value = spec.partition("=")
        if not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise ValueError(f"--env {spec!r}: expected NAME or NAME=VALUE")
        if has_value:
            out[name] = value
        elif name in env:
            out[name] = env[name]
        else:
            raise ValueError(f"--env {name}: {name} is not set here (use --env {name}=VALUE to give a value)")
    return out


def build_runtime_env(working_dir: Path | None, env_vars: dict[str, str], pip: list[str]) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if working_dir is not None:
        if not working_dir.is_dir():
            raise ValueError(f"--working-dir {working_dir}: not a directory")
        runtime_env["working_dir"] = str(working_dir.resolve())
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def submit(client: JobSubmissionClient, address: str, job: dict[str, Any], *, wait: bool) -> int:
    job_id = client.submit_job(**job)
    print(f"submitted job {job_id}: {_short_entrypoint(job['entrypoint'])}")
    print(f"dashboard: {address}/#/jobs/{job_id}", flush=True)
    if not wait:
        print(f"follow it with: upmoe jobs logs {job_id} --follow --address {address}")
        return 0
    return follow(client, address, job_id)


# --------------------------------------------------------------------------------------------------- follow


def follow(client: JobSubmissionClient, address: str, job_id: str) -> int:
    """Print the job's output as it comes; when it ends, its final status. 0 only if it SUCCEEDED."""
    try:
        try:
            _stream_in_background(client, job_id)
        except RuntimeError as e:  # the stream broke (head restart, network): the job itself may be fine
            print(f"log stream lost ({e}); waiting for job {job_id} to end", file=sys.stderr)
        _wait_until_done(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {job_id} keeps running on the cluster. "
            f"Stop it with: upmoe jobs stop {job_id} --address {address}",
            file=sys.stderr,
        )
        return 130
    return _report_end(client, job_id)


def _stream_in_background(client: JobSubmissionClient, job_id: str) -> None:
    """Print the log stream from a daemon thread until it ends; re-raise its error here.

    The main thread only waits, so Ctrl-C reaches ``follow`` at once. Inside ``asyncio.run`` a Ctrl-C only
    cancels the stream, whose websocket cleanup waits on the dashboard: on a cluster busy training, for minutes.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(_print_stream(client, job_id))
        except BaseException as e:  # handed to the main thread
            failure.append(e)

    thread = threading.Thread(target=run, name="upmoe-job-logs", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if failure:
        raise failure[0]


async def _print_stream(client: JobSubmissionClient, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _wait_until_done(client: JobSubmissionClient, job_id: str, timeout: float | None = None) -> bool:
    """Poll until the job is terminal (the log stream can close a moment before the status flips)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not client.get_job_status(job_id).is_terminal():
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _report_end(client: JobSubmissionClient, job_id: str) -> int:
    info = client.get_job_info(job_id)
    print(f"job {job_id} {_status(info.status)} after {_duration(info.start_time, info.end_time)}")
    if _status(info.status) == "SUCCEEDED":
        return 0
    if info.message:
        print(f"upmoe: job {job_id}: {info.message.strip()}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------------------------- jobs


def list_jobs(client: JobSubmissionClient) -> int:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    rows = [
        [
            j.submission_id or j.job_id or "?",
            _status(j.status),
            _clock(j.start_time),
            _duration(j.start_time, j.end_time),
            _short_entrypoint(j.entrypoint, 70),
        ]
        for j in jobs
    ]
    print(_table(["JOB", "STATUS", "STARTED", "DURATION", "ENTRYPOINT"], rows) if rows else "no jobs")
    return 0


def show_status(client: JobSubmissionClient, job_id: str) -> int:
    info = client.get_job_info(job_id)
    fields = {
        "job": job_id,
        "status": _status(info.status),
        "message": (info.message or "").strip(),
        "entrypoint": info.entrypoint,
        "ray job id": info.job_id or "",  # what the state API (actors, tasks) knows the job by
        "started": _clock(info.start_time),
        "duration": _duration(info.start_time, info.end_time),
        "env vars": " ".join(sorted((info.runtime_env or {}).get("env_vars", {}))),
    }
    for key, value in fields.items():
        if value:
            print(f"{key + ':':<12}{value}")
    return 0


def show_logs(client: JobSubmissionClient, job_id: str) -> int:
    sys.stdout.write(client.get_job_logs(job_id))
    return 0


def stop(client: JobSubmissionClient, job_id: str, timeout: float = 60.0) -> int:
    if not client.stop_job(job_id):
        print(f"job {job_id} is not running ({_status(client.get_job_status(job_id))})")
        return 0
    print(f"stopping job {job_id} ...", flush=True)
    if not _wait_until_done(client, job_id, timeout):
        print(f"job {job_id} is still {_status(client.get_job_status(job_id))} after {timeout:.0f} s", file=sys.stderr)
        return 1
    print(f"job {job_id} {_status(client.get_job_status(job_id))}")
    return 0


# --------------------------------------------------------------------------------------------------- formatting


def _status(status: Any) -> str:
    """JobStatus is a str Enum; its f-string form differs between Python versions, its value does not."""
    return str(getattr(status, "value", status))


def _short_entrypoint(entrypoint: str, width: int = 0) -> str:
    prefix = shlex.join(ENTRYPOINT_PREFIX) + " "
    text = "upmoe " + entrypoint[len(prefix) :] if entrypoint.startswith(prefix) else entrypoint
    return text if not width or len(text) <= width else text[: width - 1] + "…"


def _clock(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%m-%d %H:%M:%S") if ms else "-"


def _duration(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    seconds = int(((end_ms or time.time() * 1000) - start_ms) / 1000)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
