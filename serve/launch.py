"""Running the endpoint: ``upmoe serve`` (start, print the URL, block until Ctrl-C) and ``--emit-config``."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import yaml

from serve.options import ServeOptions

APP_NAME = "upmoe"
READY_TIMEOUT_S = 600


def serve_config(opts: ServeOptions) -> dict[str, Any]:
    """A Ray Serve config file (``serve deploy``/RayService ``serveConfigV2``) for the same deployment."""
    args = {k: v for k, v in opts.as_dict().items() if v is not None and k not in ("host", "port", "ray_address")}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": opts.host, "port": opts.port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "serve.app:build_app", "args": args}],
    }


def emit_config(opts: ServeOptions) -> str:
    header = "# Ray Serve config for upmoe: `serve deploy serve.yaml` (needs upmoe installed on the cluster).\n"
    if opts.api_key:
        header += "# It contains the API key: keep it private, or remove api_key and set UPMOE_API_KEY instead.\n"
    return header + yaml.safe_dump(serve_config(opts), sort_keys=False)


def deployment_messages(serve: Any) -> str:
    """Why the deployments failed, from Serve's status (the replicas' tracebacks), for the error message."""
    try:
        app = serve.status().applications[APP_NAME]
    except (KeyError, Exception):  # status unavailable: the replica logs still have it
        return "see the replica logs in the Ray session's logs/serve/ directory"
    lines = [f"{name}: {d.message.strip()}" for name, d in app.deployments.items() if d.message]
    return "\n".join(lines[-1:]) or app.message


def run_serve(opts: ServeOptions) -> int:
    import ray
    from ray import serve

    from serve.app import build_app

    app = build_app(opts.as_dict())  # fails fast on a bad model directory, before Ray starts
    # Without an address (flag or RAY_ADDRESS, which Ray jobs get) this starts a private local Ray that we
    # tear down with Serve at the end; on a shared cluster we remove only our application.
    private = opts.ray_address is None and not os.environ.get("RAY_ADDRESS")
    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=opts.ray_address, log_to_driver=False, configure_logging=False)
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:  # Ctrl-C, and `ray job stop` / Kubernetes
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
        print(
            f"upmoe serve: deploying {opts.model_dir} (EP={opts.ep}, replicas {opts.min_replicas}..."
            f"{opts.max_replicas})",
            flush=True,
        )
        started = time.monotonic()
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{deployment_messages(serve)}") from None
        url = f"http://{opts.host}:{opts.port}"
        print(
            f"upmoe serve: ready in {time.monotonic() - started:.0f} s at {url}/v1 (model {opts.model_name!r}); "
            "Ctrl-C to stop",
            flush=True,
        )
        while not stop.wait(1.0):
            pass
        print("upmoe serve: shutting down", flush=True)
    finally:
        try:
            serve.delete(APP_NAME)
            if private:
                serve.shutdown()
        finally:
            if connected_here:
                ray.shutdown()
            for sig, handler in previous.items():
                if handler is not None:  # None: installed outside Python, nothing to restore
                    signal.signal(sig, handler)
    return 0
