"""Ray token authentication for the client side of ``upmoe submit`` / ``upmoe jobs`` / ``upmoe cluster``.

A Ray 2.60 cluster started with ``RAY_AUTH_MODE=token`` refuses dashboard (HTTP) and GCS (gRPC) requests that
lack ``Authorization: Bearer TOKEN``: 401 without a header, 403 with a wrong one. Ray's own job SDK attaches the
header only when the *client* process also runs with ``RAY_AUTH_MODE=token``; a user who exported just
``RAY_AUTH_TOKEN`` would get a confusing 401. So we find the token ourselves, in the order Ray's C++
``AuthenticationTokenLoader`` uses (``RAY_AUTH_TOKEN``, then the file at ``RAY_AUTH_TOKEN_PATH``, then
``~/.ray/auth_token``), and pass the header explicitly; the SDK keeps a caller's Authorization header as is.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def default_token_file() -> Path:
    """Where ``ray get-auth-token --generate`` writes and where every Ray process looks last."""
    return Path.home() / ".ray" / "auth_token"


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # for messages: which of the three places it came from

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def find_token(environ: Mapping[str, str] | None = None) -> Token | None:
    """The token a Ray client on this machine would use, or None when there is none anywhere."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV, "").strip():
        return Token(env[TOKEN_ENV].strip(), f"${TOKEN_ENV}")
    if env.get(TOKEN_PATH_ENV):
        path = Path(env[TOKEN_PATH_ENV]).expanduser()
        value = path.read_text().strip() if path.is_file() else ""
        if not value:  # Ray itself refuses this case rather than falling back to ~/.ray/auth_token
            raise ValueError(f"${TOKEN_PATH_ENV} is set to {path}, which is missing or empty")
        return Token(value, f"${TOKEN_PATH_ENV} ({path})")
    path = default_token_file()
    if path.is_file() and path.read_text().strip():
        return Token(path.read_text().strip(), str(path))
    return None


def new_token() -> str:
    """256 random bits as hex: the same shape ``ray get-auth-token --generate`` makes."""
    return secrets.token_hex(32)


def write_token_file(path: Path, token: str) -> None:
    """Write the token readable by its owner only: it lets anyone who holds it run code on the cluster."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def auth_failure_message(address: str, ray_message: str, token: Token | None) -> str:
    """One line for a refused request; Ray's own text spans paragraphs and says nothing about where to look."""
    if "required" in ray_message.lower() or token is None:  # HTTP 401: no token was sent
        where = f"${TOKEN_ENV}, ${TOKEN_PATH_ENV} (a file) or {default_token_file()}"
        return (
            f"the Ray cluster at {address} requires a token: set {where} "
            "(on the head node `ray get-auth-token` prints it; `upmoe cluster up` prints the export lines)"
        )
    return (  # HTTP 403: a token was sent and it was not the cluster's
        f"the Ray cluster at {address} refused the token from {token.source}: it is not this cluster's token "
        f"(on the head node `ray get-auth-token` prints the right one)"
    )
