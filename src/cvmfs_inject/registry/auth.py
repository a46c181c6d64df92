"""Answering a registry's authentication challenges.

Basic challenges get the Basic header; Bearer challenges get a token from the realm (the
distribution token protocol: GET realm?service=&scope=, with the Basic header when there
are credentials), one per repository scope, kept for later requests. The token request
has timeouts, reads at most `MAX_TOKEN_ANSWER` bytes within `TOKEN_DEADLINE` seconds, and
takes only a JSON object with a string token, so a hostile or broken token server costs
one line and exit 6, never a hang or the machine's memory.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time

import requests
import urllib3.exceptions

from cvmfs_inject.errors import ToolError
from cvmfs_inject.registry.credentials import Credentials
from cvmfs_inject.registry.errors import short_reason, tls_error

MAX_TOKEN_ANSWER = 1 << 20  # a token answer is a few kilobytes
TOKEN_TIMEOUT = (30.0, 60.0)  # connect, and each read
TOKEN_DEADLINE = 120.0  # the whole answer
# a bearer token goes into a header: printable ASCII, no spaces (never echoed in errors)
_TOKEN = re.compile(r"[\x21-\x7e]+")
# a challenge's parameters: realm="...",service="...",scope="..." (RFC 7235 quoted strings;
# a scope holds commas and colons, never a quote)
_PARAMETER = re.compile(r'(?:^|[\s,])([A-Za-z]+)="([^"]*)"')


def challenge_parameters(challenge: str) -> dict[str, str]:
    """The quoted parameters of a ``WWW-Authenticate`` challenge, by lower-case name."""
    return {name.lower(): value for name, value in _PARAMETER.findall(challenge)}


class Authenticator:
    def __init__(self, registry: str, session: requests.Session,
                 credentials: Credentials | None, tls_verify: bool, verify: bool | str,
                 cert: tuple[str, str] | None) -> None:
        self.registry = registry
        self._session = session
        self._credentials = credentials
        self._scheme = "https" if tls_verify else "http"
        self._verify, self._cert = verify, cert
        self._basic_header: str | None = None
        if credentials is not None:
            pair = f"{credentials.username}:{credentials.password}".encode()
            self._basic_header = "Basic " + base64.b64encode(pair).decode()
        self._use_basic = False
        self._tokens: dict[str, str] = {}

    def header(self, repo: str) -> str | None:
        if self._use_basic:
            return self._basic_header
        return self._tokens.get(repo)

    def answer(self, resp: requests.Response, repo: str, sent: str | None) -> bool:
        """Answer a 401/403 challenge; True when there is a new header worth retrying with.

        A ``Basic`` challenge gets the Basic header (a client that treats every challenge as
        a Bearer one, like oras-py's TokenAuth, would fetch a token from the realm string);
        only ``Bearer`` asks a token server.
        """
        challenge = resp.headers.get("WWW-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic":
            if self._basic_header is None or sent == self._basic_header:
                return False
            self._use_basic = True
            return True
        if scheme != "bearer":
            return False
        parameters = challenge_parameters(challenge)
        realm = parameters.get("realm")
        if not realm:
            return False
        try:
            token = self._within_deadline(realm, parameters.get("service"),
                                          parameters.get("scope"))
        except requests.exceptions.SSLError as exc:
            raise tls_error(self.registry, exc) from None
        except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.TimeoutError,
                urllib3.exceptions.ProtocolError) as exc:  # urllib3's: the body is read raw
            raise ToolError(f"{self.registry}: token server {realm} unreachable: "
                            f"{short_reason(exc)}") from None
        except (ValueError, requests.RequestException, urllib3.exceptions.HTTPError):
            raise ToolError(f"{self.registry}: the token server gave an invalid answer for "
                            f"{repo}") from None
        if token is None:
            return False
        header = f"Bearer {token}"
        if header == sent:
            return False
        self._tokens[repo] = header
        return True

    def _within_deadline(self, realm: str, service: str | None, scope: str | None
                         ) -> str | None:
        """`_request_token` in a thread, waited for at most TOKEN_DEADLINE seconds in all:
        per-read timeouts alone let a server that trickles its headers hold us forever. A
        request still running then is left to its own timeouts; the command fails."""
        outcome: list[tuple[str | None, BaseException | None]] = []

        def request() -> None:
            try:
                outcome.append((self._request_token(realm, service, scope), None))
            except BaseException as exc:  # raised in the waiting thread
                outcome.append((None, exc))

        worker = threading.Thread(target=request, name="cvmfs-inject-token", daemon=True)
        worker.start()
        worker.join(TOKEN_DEADLINE)
        if not outcome:
            raise ToolError(f"{self.registry}: token server {realm} did not answer within "
                            f"{TOKEN_DEADLINE:.0f} s")
        token, error = outcome[0]
        if error is not None:
            raise error
        return token

    def _request_token(self, realm: str, service: str | None, scope: str | None) -> str | None:
        """The token the realm gives (None when it refuses); ValueError for an answer that
        is not a small JSON object with a string `token` or `access_token`."""
        if not realm.startswith(("http://", "https://")):
            realm = f"{self._scheme}://{realm}"
        params = {key: value for key, value in (("service", service), ("scope", scope))
                  if value}
        headers = {"Accept": "application/json"}
        if self._basic_header is not None:
            headers["Authorization"] = self._basic_header
        if self._basic_header is not None and self._scheme == "https" \
                and not realm.startswith("https://"):
            raise ToolError(f"{self.registry}: its token server {realm} is plain http; "
                            "credentials are not sent there")
        deadline = time.monotonic() + TOKEN_DEADLINE
        with self._session.get(realm, params=params, headers=headers, stream=True,
                               timeout=TOKEN_TIMEOUT, verify=self._verify,
                               cert=self._cert) as resp:
            if resp.status_code >= 500 or resp.status_code == 429:
                raise ToolError(f"{self.registry}: token server {realm} answered HTTP "
                                f"{resp.status_code}; try again later")
            if resp.status_code != 200:
                return None
            body = bytearray()
            # read1: at most one receive each, so the deadline holds against a server
            # that sends a byte now and then
            while chunk := resp.raw.read1(64 << 10, decode_content=True):
                body += chunk
                if len(body) > MAX_TOKEN_ANSWER or time.monotonic() > deadline:
                    raise ValueError("token answer too large or too slow")
        try:
            doc = json.loads(body)
        except RecursionError:
            raise ValueError("token answer nested too deeply") from None
        if not isinstance(doc, dict):
            raise ValueError("token answer is not a JSON object")
        token = doc.get("token") or doc.get("access_token")
        if not token:
            return None
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise ValueError("token is not a string of printable characters")
        return token

    def failed(self, status: int, repo: str) -> ToolError:
        hint = "" if self._credentials else " (no credentials were found for this registry)"
        return ToolError(f"{self.registry}: authentication failed ({status}) for {repo}; "
                         f"check --authfile / credentials{hint}")
