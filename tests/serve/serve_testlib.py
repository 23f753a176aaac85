"""Helpers for the serving tests: endpoints deployed for the length of a ``with`` block, background load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx


@contextmanager
def running_endpoint(port: int, options: dict[str, Any], app_name: str = "upmoe") -> Iterator[str]:
    """Deploy ``serve.app:build_app(options)`` and yield its base URL; delete the application afterwards."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(options), name=app_name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url
    finally:
        serve.delete(app_name)


def wait_healthy(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy in {timeout_s} s")


class BackgroundLoad:
    """Clients that keep posting the same completion request until stopped; ``codes`` collects the statuses."""

    def __init__(self, url: str, body: dict[str, Any], clients: int) -> None:
        self.url, self.body = url, body
        self.codes: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def _client(self) -> None:
        while not self._stop.is_set():
            response = httpx.post(f"{self.url}/v1/completions", json=self.body, timeout=120)
            self.codes.append(response.status_code)

    def __enter__(self) -> BackgroundLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)
