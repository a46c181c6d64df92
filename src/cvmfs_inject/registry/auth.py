"""Answering a registry's authentication challenges (oras-py does the token requests).

Basic challenges get the Basic header; Bearer challenges get a token from the realm, one
per repository scope, kept for later requests. oras-py gap: its TokenAuth would answer a
``Basic`` challenge by fetching a token from the realm string.
"""

from __future__ import annotations

from typing import Any

import oras.auth
import oras.auth.utils
import requests

from cvmfs_inject.errors import ToolError
from cvmfs_inject.registry.credentials import Credentials
from cvmfs_inject.registry.errors import short_reason, tls_error


class Authenticator:
    def __init__(self, registry: str, token_auth: Any, session: requests.Session,
                 credentials: Credentials | None, tls_verify: bool, verify: bool | str) -> None:
        self.registry = registry
        self._token_auth = token_auth
        self._credentials = credentials
        self._basic_header: str | None = None
        if credentials is not None:
            # TokenAuth sends these to the token server; BasicAuth builds the Basic header.
            token_auth.set_basic_auth(credentials.username, credentials.password)
            basic = oras.auth.get_auth_backend("basic", session, not tls_verify,
                                               tls_verify=verify)
            basic.set_basic_auth(credentials.username, credentials.password)
            self._basic_header = basic.get_auth_header()["Authorization"]
        self._use_basic = False
        self._tokens: dict[str, str] = {}

    def header(self, repo: str) -> str | None:
        if self._use_basic:
            return self._basic_header
        return self._tokens.get(repo)

    def answer(self, resp: requests.Response, repo: str, sent: str | None) -> bool:
        """Answer a 401/403 challenge; True when there is a new header worth retrying with.

        oras-py gap: its TokenAuth would answer a ``Basic`` challenge by fetching a token
        from the realm string; we route Basic to the Basic header and only Bearer to oras.
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
        # oras-py's token requests, called directly rather than through its
        # authenticate_request, which logs an error to stderr on every refused token.
        parsed = oras.auth.utils.parse_auth_header(challenge)
        if not parsed.realm:
            return False
        try:
            if self._credentials is None:
                token = self._token_auth.request_anonymous_token(parsed)
            else:
                token = self._token_auth.request_token(parsed)
        except requests.exceptions.SSLError as exc:
            raise tls_error(self.registry, exc) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ToolError(f"{self.registry}: token server {parsed.realm} unreachable: "
                            f"{short_reason(exc)}") from None
        except (ValueError, requests.RequestException):
            raise ToolError(f"{self.registry}: the token server gave an invalid answer for "
                            f"{repo}") from None
        if not token or not isinstance(token, str):
            return False
        header = f"Bearer {token}"
        if header == sent:
            return False
        self._tokens[repo] = header
        return True

    def failed(self, status: int, repo: str) -> ToolError:
        hint = "" if self._credentials else " (no credentials were found for this registry)"
        return ToolError(f"{self.registry}: authentication failed ({status}) for {repo}; "
                         f"check --authfile / credentials{hint}")
