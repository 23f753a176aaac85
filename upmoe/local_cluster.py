"""``upmoe cluster up|down|status``: a real multi-node Ray cluster on this one machine, with token authentication.

Why several raylets rather than one big node: placement (EP ranks on different nodes, Serve gangs) only shows
when the scheduler sees several nodes. ``ray.cluster_utils.Cluster`` builds such a cluster inside the calling
process and dies with it; here each node is a ``ray start --block`` process of its own, so the cluster outlives
the command and takes jobs (``upmoe submit``) exactly like a remote one, token and all.

Ports: several raylets on one host must not share a fixed port. What Ray already binds to a free port is left
so (GCS clients, node and object managers, metrics export, runtime-env agent, agent gRPC). Two defaults are
fixed and would collide: the dashboard agent's HTTP port (52365) and the worker port range (10002-19999), so
every node gets ``--dashboard-agent-listen-port 0 --min-worker-port 0 --max-worker-port 0`` (free ports, as
``ray.cluster_utils`` does). The head's Ray Client server (default 10001) gets a free port too; worker nodes run
no log monitor (the head's one reads the shared session log directory, as in ``ray.cluster_utils``).

Isolation: the nodes share one ``--temp-dir`` of their own (default /tmp/upmoe-ray-UID). ``ray start`` records the
cluster in TEMP_DIR/ray_current_cluster, so a bare ``ray.init()`` elsewhere on the machine, which looks in
/tmp/ray, does not attach to this cluster. The state file TEMP_DIR/upmoe-cluster.json lists the node processes;
``cluster down`` stops exactly those (each ``ray start --block`` shuts its node down on SIGTERM; whatever they
started and is still there after a grace period gets SIGKILL). ``ray stop`` is never used: it kills every Ray
process on the machine, including other people's clusters.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import requests

from upmoe.ray_auth import AUTH_MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV, new_token, write_token_file

STATE_FILE = "upmoe-cluster.json"
TOKEN_FILE = "auth_token"
RESOURCE_PREFIX = "upmoe_node_"  # node i carries {"upmoe_node_i": 1}; the head is node 0
# Variables that would point the node processes at some other cluster or token than this one's.
FOREIGN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", TOKEN_PATH_ENV)


def default_temp_dir() -> Path:
    """Short on purpose: Ray puts Unix sockets under it, and socket paths are limited to ~107 bytes."""
    return Path(tempfile.gettempdir()) / f"upmoe-ray-{os.getuid()}"


@dataclass
class NodeRecord:
    name: str  # "head", "worker1", ...
    resource: str  # the custom resource only this node has
    pid: int  # the `ray start --block` process, leader of the node's process group
    create_time: float  # with pid: guards against a recycled pid
    log: str


@dataclass
class ClusterState:
    temp_dir: str
    head_port: int
    dashboard_url: str
    token_file: str
    cpus_per_node: float
    nodes: list[NodeRecord] = field(default_factory=list)

    def save(self) -> None:
        path = Path(self.temp_dir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, temp_dir: Path) -> ClusterState | None:
        path = temp_dir / STATE_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        raw["nodes"] = [NodeRecord(**n) for n in raw["nodes"]]
        return cls(**raw)

    def token(self) -> str:
        return Path(self.token_file).read_text().strip()


# --------------------------------------------------------------------------------------------------- CLI


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Start or stop a real multi-node Ray cluster on this machine: a head and N worker raylets, each its own "
        "node with --cpus-per-node CPUs and a custom resource upmoe_node_I (head = 0), token authentication on. "
        "Use it to try `upmoe submit` and multi-node placement without a cloud."
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="{up,down,status}")
    up = sub.add_parser("up", help="start the cluster and wait until every node is alive")
    up.add_argument("--nodes", type=int, required=True, help="worker nodes besides the head (total = N + 1)")
    up.add_argument("--cpus-per-node", type=float, default=1.0, help="CPUs each node advertises (default 1)")
    up.add_argument("--head-port", type=int, default=6390, help="GCS port (default 6390; 6379 is Ray's own)")
    up.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / job API port (default 8265)")
    up.add_argument("--object-store-mb", type=int, default=512, help="object store per node in MiB (default 512)")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all nodes (default 120)")
    for p in (
        up,
        sub.add_parser("down", help="stop the cluster started by `up`"),
        sub.add_parser("status", help="nodes alive, address, exports"),
    ):
        p.add_argument("--temp-dir", type=Path, default=default_temp_dir(), help="Ray temp dir and state file location")


def run(name: str, args: argparse.Namespace) -> int:
    temp_dir = args.temp_dir.expanduser().resolve()
    if args.action == "up":
        return cluster_up(temp_dir, args)
    if args.action == "down":
        return cluster_down(temp_dir)
    return cluster_status(temp_dir)


# --------------------------------------------------------------------------------------------------- up


def cluster_up(temp_dir: Path, args: argparse.Namespace) -> int:
    if args.nodes < 0:
        raise ValueError("--nodes must be >= 0")
    _refuse_if_running(temp_dir)
    for port, flag in ((args.head_port, "--head-port"), (args.dashboard_port, "--dashboard-port")):
        if not _port_free(port):
            raise ValueError(f"port {port} is in use (another Ray cluster?): pick another with {flag}")
    temp_dir.mkdir(parents=True, exist_ok=True)
    token_file = temp_dir / TOKEN_FILE
    write_token_file(token_file, new_token())
    state = ClusterState(
        temp_dir=str(temp_dir),
        head_port=args.head_port,
        dashboard_url=f"http://127.0.0.1:{args.dashboard_port}",
        token_file=str(token_file),
        cpus_per_node=args.cpus_per_node,
    )
    start = time.perf_counter()
    try:
        _start_node(state, 0, _head_flags(state, args), args)
        _wait_for_nodes(state, 1, args.timeout)
        for i in range(1, args.nodes + 1):
            _start_node(state, i, ["--address", f"127.0.0.1:{args.head_port}", "--include-log-monitor", "false"], args)
        _wait_for_nodes(state, args.nodes + 1, args.timeout)
    except BaseException:
        _stop_nodes(state)
        (temp_dir / STATE_FILE).unlink(missing_ok=True)
        token_file.unlink(missing_ok=True)
        raise
    print(f"local Ray cluster up in {time.perf_counter() - start:.0f} s: head + {args.nodes} worker node(s)")
    _print_summary(state)
    return 0


def _head_flags(state: ClusterState, args: argparse.Namespace) -> list[str]:
    return [
        "--head",
        "--port",
        str(state.head_port),
        "--temp-dir",
        state.temp_dir,
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(args.dashboard_port),
        "--ray-client-server-port",
        str(_free_port()),
    ]


def _start_node(state: ClusterState, index: int, role_flags: list[str], args: argparse.Namespace) -> None:
    """Launch one node as `ray start --block` in a session of its own, and record it before anything can fail."""
    name = "head" if index == 0 else f"worker{index}"
    resource = f"{RESOURCE_PREFIX}{index}"
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--block",
        *role_flags,
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        f"{args.cpus_per_node:g}",
        "--num-gpus",
        "0",
        "--resources",
        json.dumps({resource: 1}),
        "--object-store-memory",
        str(args.object_store_mb * 1024 * 1024),
        "--dashboard-agent-listen-port",
        "0",
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",
        "--disable-usage-stats",
    ]
    log = Path(state.temp_dir) / "upmoe-nodes" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_node_env(state),
            start_new_session=True,
        )
    record = NodeRecord(name, resource, proc.pid, psutil.Process(proc.pid).create_time(), str(log))
    state.nodes.append(record)
    state.save()


def _node_env(state: ClusterState) -> dict[str, str]:
    """Token auth on, this cluster's token, and this interpreter's bin dir first on PATH.

    Every Ray process inherits this environment, job drivers included: their `ray.init()` needs the token, and
    `python -m upmoe.cli ...` entrypoints from `upmoe submit` must find the Python that has upmoe installed.
    """
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env[AUTH_MODE_ENV] = "token"
    env[TOKEN_ENV] = state.token()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _wait_for_nodes(state: ClusterState, count: int, timeout: float) -> None:
    """Until `count` of our nodes are ALIVE in the GCS, as the dashboard's state API reports them."""
    deadline = time.monotonic() + timeout
    while True:
        dead = [n for n in state.nodes if not _alive(n)]
        if dead:
            raise RuntimeError(f"Ray node {dead[0].name} exited during startup:\n{_log_tail(dead[0].log)}")
        if len(_alive_resources(state)) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(_alive_resources(state))} of {count} Ray nodes came up in {timeout:.0f} s")
        time.sleep(0.5)


def _alive_resources(state: ClusterState) -> set[str]:
    """Our custom resources on ALIVE nodes; empty while the dashboard is not up yet."""
    try:
        r = requests.get(
            f"{state.dashboard_url}/api/v0/nodes",
            params={"detail": "1", "limit": "1000"},
            headers={"Authorization": f"Bearer {state.token()}"},
            timeout=5,
        )
    except requests.RequestException:
        return set()
    if r.status_code != 200:
        return set()
    nodes = r.json().get("data", {}).get("result", {}).get("result", [])
    alive = [n for n in nodes if n.get("state") == "ALIVE"]
    return {res for n in alive for res in n.get("resources_total", {}) if res.startswith(RESOURCE_PREFIX)}


def _print_summary(state: ClusterState) -> None:
    cpus = f"{state.cpus_per_node:g} CPU{'s' if state.cpus_per_node != 1 else ''}"
    print(f"  nodes:      {', '.join(f'{n.name} ({n.resource}, {cpus})' for n in state.nodes)}")
    print(f"  dashboard:  {state.dashboard_url}   (job submission address)")
    print(f"  GCS:        port {state.head_port}   (ray.init(address='127.0.0.1:{state.head_port}'))")
    print(f"  token file: {state.token_file}   (token authentication is on)")
    print(f"  logs:       {state.temp_dir}/session_latest/logs, node start-up logs in {state.temp_dir}/upmoe-nodes")
    print("Clients need the address and the token (RAY_API_SERVER_ADDRESS, not RAY_ADDRESS: a driver run such")
    print("as `upmoe train --ray-address 127.0.0.1:PORT` would read RAY_ADDRESS as a GCS address):")
    print(f"  export RAY_API_SERVER_ADDRESS={state.dashboard_url}")
    print(f"  export RAY_AUTH_TOKEN=$(cat {state.token_file})")
    print("  export RAY_AUTH_MODE=token   # only for Ray's own CLI/SDK (`ray job ...`); upmoe sends the token anyway")
    temp = "" if Path(state.temp_dir) == default_temp_dir() else f" --temp-dir {state.temp_dir}"
    print(f"Stop it with: upmoe cluster down{temp}")


# --------------------------------------------------------------------------------------------------- down, status


def cluster_down(temp_dir: Path) -> int:
    state = ClusterState.load(temp_dir)
    if state is None:
        print(f"no local cluster recorded in {temp_dir}: nothing to stop")
        return 0
    killed = _stop_nodes(state)
    (temp_dir / STATE_FILE).unlink(missing_ok=True)
    Path(state.token_file).unlink(missing_ok=True)
    note = f" ({killed} process(es) needed SIGKILL)" if killed else ""
    print(f"stopped the local Ray cluster in {temp_dir} ({len(state.nodes)} node(s)){note}")
    return 0


def cluster_status(temp_dir: Path) -> int:
    state = ClusterState.load(temp_dir)
    if state is None:
        print(f"no local cluster recorded in {temp_dir}")
        return 1
    running = [n for n in state.nodes if _alive(n)]
    alive = _alive_resources(state)
    print(
        f"local Ray cluster in {temp_dir}: {len(running)}/{len(state.nodes)} node processes running, "
        f"{len(alive)} node(s) alive in the GCS"
    )
    _print_summary(state)
    return 0 if len(alive) == len(state.nodes) else 1


def _refuse_if_running(temp_dir: Path) -> None:
    state = ClusterState.load(temp_dir)
    if state is not None and any(_alive(n) for n in state.nodes):
        temp = "" if temp_dir == default_temp_dir() else f" --temp-dir {temp_dir}"
        raise ValueError(
            f"a local Ray cluster is already up ({state.dashboard_url}, {len(state.nodes)} node(s), state in "
            f"{temp_dir / STATE_FILE}): stop it first with `upmoe cluster down{temp}`"
        )


def _stop_nodes(state: ClusterState, grace: float = 15.0, orphan_grace: float = 5.0) -> int:
    """SIGTERM every node's `ray start`, wait, SIGKILL what is left; returns how many needed SIGKILL.

    The victims are collected before signalling: the node leaders, everything below them (raylet, GCS,
    dashboard, workers, job drivers, which Ray puts in process groups of their own), and any process still
    naming this cluster's temp dir (orphans of an earlier crash). A leader shuts its node down in about 4 s,
    but with Serve replicas still in their graceful shutdown the raylet waits for them (measured: over 30 s);
    a throwaway local cluster is not worth that wait, so after `grace` seconds the rest gets SIGKILL.
    """
    leaders = [p for n in state.nodes if (p := _process(n)) is not None]
    victims = {p.pid: p for p in leaders}
    for leader in leaders:
        victims.update({c.pid: c for c in _safe_children(leader)})
    victims.update({p.pid: p for p in _processes_naming(Path(state.temp_dir))})
    for pid in _self_and_ancestors():
        victims.pop(pid, None)
    for leader in leaders:
        _signal(leader, signal.SIGTERM)
    _, leaders_left = psutil.wait_procs(leaders, timeout=grace)
    others = [p for pid, p in victims.items() if pid not in {q.pid for q in leaders}]
    _, others_left = psutil.wait_procs(others, timeout=orphan_grace)
    left = [*leaders_left, *others_left]
    for proc in left:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(left, timeout=10)
    return len(left)


def _process(node: NodeRecord) -> psutil.Process | None:
    """The node's `ray start` process if it is still the one we started (pids get recycled)."""
    try:
        proc = psutil.Process(node.pid)
        return proc if abs(proc.create_time() - node.create_time) < 1.0 else None
    except psutil.Error:
        return None


def _alive(node: NodeRecord) -> bool:
    proc = _process(node)
    try:
        return proc is not None and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _safe_children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _processes_naming(temp_dir: Path) -> list[psutil.Process]:
    """Processes whose command line mentions a path inside temp_dir (raylets, GCS, workers all do)."""
    needle = str(temp_dir) + os.sep
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if any(needle in part for part in cmdline):
            found.append(proc)
    return found


def _self_and_ancestors() -> set[int]:
    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.parents())}


def _signal(proc: psutil.Process, sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _port_free(port: int) -> bool:
    """Nobody listens on it. SO_REUSEADDR as servers use it: connections of a stopped cluster in TIME_WAIT
    would otherwise make a just-freed port look taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _log_tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
