"""A registry whose token server (the distribution token protocol: 401 with
`WWW-Authenticate: Bearer realm=...`) or error answers are broken or hostile. Whatever it
does, a command ends with one line and exit 6 (a tool or registry failure): no hang, no
unbounded memory, no traceback, no control characters reaching the terminal. A small HTTP
server plays the hostile part; no real registry serves this badly."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import requests

from cvmfs_inject.registry import auth

TOOL, NOT_FOUND = 6, 4


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/token"):
            self.server.tokens(self)
        elif self.server.behaviour == "multi-line error":
            self._reply(500, {"errors": [{"code": "UNKNOWN",
                                          "message": "boom\nsecond line \x1b[31mred"}]})
        elif self.headers.get("Authorization") == "Bearer good":
            self._reply(404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]})
        else:
            host = f"127.0.0.1:{self.server.server_address[1]}"
            self.send_response(401)
            self.send_header("WWW-Authenticate", f'Bearer realm="http://{host}/token",'
                             'service="test",scope="repository:a/b:pull"')
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _reply(self, status: int, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour = "good"
    stop = threading.Event()

    def tokens(self, handler: _Handler) -> None:
        if self.behaviour == "silent":
            self.stop.wait(30)
            return
        if self.behaviour == "endless":
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.end_headers()
            chunk = b" " * (64 << 10)
            while not self.stop.is_set():
                try:
                    handler.wfile.write(chunk)
                except OSError:
                    return
            return
        if self.behaviour == "trickling headers":  # each byte well within a read timeout
            handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
            while not self.stop.wait(0.3):
                try:
                    handler.wfile.write(b"X")
                    handler.wfile.flush()
                except OSError:
                    return
            return
        if self.behaviour in ("silent body", "short body", "bad gzip"):
            handler.send_response(200)
            handler.send_header("Content-Length", "100")
            if self.behaviour == "bad gzip":
                handler.send_header("Content-Encoding", "gzip")
            handler.end_headers()
            if self.behaviour == "silent body":
                self.stop.wait(30)
            else:
                handler.wfile.write(b"x" * (100 if self.behaviour == "bad gzip" else 10))
                handler.close_connection = True
            return
        if self.behaviour == "busy":
            handler._reply(503, {"details": "try later"})
            return
        if self.behaviour == "deep":
            body = b"[" * 100_000 + b"]" * 100_000
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        doc = {"good": {"token": "good"}, "list": [], "string": "abc",
               "number-token": {"token": 42},
               "header injection": {"token": "abc\r\nX-Injected: 1"},
               "access-token-only": {"access_token": "good", "expires_in": 300}}[self.behaviour]
        handler._reply(200, doc)


@pytest.fixture
def token_server() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("behaviour", ["silent", "endless", "list", "string", "number-token",
                                       "busy", "deep", "trickling headers",
                                       "header injection", "silent body", "short body",
                                       "bad gzip"])
def test_a_broken_token_server_is_one_line_and_exit_6(cli, token_server, monkeypatch,
                                                       behaviour):
    monkeypatch.setattr(auth, "TOKEN_TIMEOUT", (2.0, 1.0))
    monkeypatch.setattr(auth, "TOKEN_DEADLINE", 3.0)
    token_server.behaviour = behaviour
    port = token_server.server_address[1]
    result = cli("inspect", "--no-tls-verify", f"docker://127.0.0.1:{port}/a/b:1")
    assert result.code == TOOL, result.err
    assert result.err.count("\n") == 1 and "token server" in result.err, result.err
    assert "X-Injected" not in result.err


@pytest.mark.parametrize("behaviour", ["good", "access-token-only"])
def test_a_good_token_is_used(cli, token_server, behaviour):
    """The token the server gives (as `token`, or only as OAuth2's `access_token`) reaches
    the registry (which then says: not found)."""
    token_server.behaviour = behaviour
    port = token_server.server_address[1]
    result = cli("inspect", "--no-tls-verify", f"docker://127.0.0.1:{port}/a/b:1")
    assert result.code == NOT_FOUND, result.err


def test_a_registry_message_is_printed_on_one_line_without_control_characters(
        cli, token_server):
    token_server.behaviour = "multi-line error"
    port = token_server.server_address[1]
    result = cli("inspect", "--no-tls-verify", f"docker://127.0.0.1:{port}/a/b:1")
    assert result.code == TOOL, result.err
    assert result.err.count("\n") == 1 and "\x1b" not in result.err
    assert "boom\\nsecond line \\x1b[31mred" in result.err


@pytest.mark.parametrize(("challenge", "expected"), [
    ('Bearer realm="https://auth.example/token",service="registry.example",'
     'scope="repository:a/b:pull,push"',
     {"realm": "https://auth.example/token", "service": "registry.example",
      "scope": "repository:a/b:pull,push"}),
    ('Bearer Realm="https://a/t", scope="repository:x:pull"',  # names are case-insensitive
     {"realm": "https://a/t", "scope": "repository:x:pull"}),
    ('Bearer realm=""', {"realm": ""}),
    ('Bearer realm="https://good/t",x_realm="https://evil/t"', {"realm": "https://good/t"}),
    ("Bearer", {}),
])
def test_challenge_parameters(challenge: str, expected: dict[str, str]) -> None:
    assert auth.challenge_parameters(challenge) == expected


def test_a_bearer_challenge_without_realm_is_not_answered() -> None:
    """No realm, no token server to ask: the 401 stands (exit 6 from the caller)."""
    answer = SimpleNamespace(headers={
        "WWW-Authenticate": 'Bearer service="s",scope="repository:a:pull"'})
    authenticator = auth.Authenticator("r.example", requests.Session(), None, True, True, None)
    assert authenticator.answer(answer, "a", None) is False  # type: ignore[arg-type]
