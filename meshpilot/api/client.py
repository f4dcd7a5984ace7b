"""The management API's command-line client: what ``meshpilot service|instance|proxies|policy``
share to reach a running control plane. The flags that name the API and its token, the client
that calls it and sends the token with every request, reads included (an error answer or an
unreachable API ends the command with a message), and how answers are printed. Standard library only, so a subcommand starts fast."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any

__all__ = ["ApiClient", "add_api_flags", "api_client", "api_token", "print_json"]


class ApiClient:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())
                msg = err.get("error", "")
            except ValueError:
                msg = exc.reason
            raise SystemExit(f"meshpilot: {method} {path}: {exc.code} {msg}") from None
        except urllib.error.URLError as exc:
            raise SystemExit(f"meshpilot: cannot reach the management API at {self.url}: {exc.reason}") from None


def add_api_flags(p: argparse.ArgumentParser) -> None:
    """``--api``, ``--token`` and ``--token-file`` on a subcommand that talks to the API."""
    p.add_argument("--api", default=os.environ.get("MESHPILOT_API", "http://127.0.0.1:15014"), help="management API URL")
    p.add_argument("--token", help="access token, sent with every request; a control plane with a token configured asks for "
                                   "one on reads too (visible in ps: prefer --token-file or MESHPILOT_TOKEN)")
    p.add_argument("--token-file", help="read the access token from this file (or MESHPILOT_TOKEN_FILE)")


def api_client(args: argparse.Namespace) -> ApiClient:
    """The client the parsed ``add_api_flags`` name."""
    return ApiClient(args.api, api_token(args))


def api_token(args: argparse.Namespace) -> str | None:
    """--token, else --token-file, else $MESHPILOT_TOKEN, else the file named by $MESHPILOT_TOKEN_FILE."""
    from meshpilot.settings import read_token

    env = os.environ
    try:
        if args.token:
            return str(args.token)
        if args.token_file:
            return read_token(args.token_file, "--token-file")
        if env.get("MESHPILOT_TOKEN"):
            return env["MESHPILOT_TOKEN"]
        if env.get("MESHPILOT_TOKEN_FILE"):
            return read_token(env["MESHPILOT_TOKEN_FILE"], "MESHPILOT_TOKEN_FILE")
    except ValueError as exc:
        raise SystemExit(f"meshpilot: {exc}") from None
    return None


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))
