"""Start a real throwaway ``docker-registry`` (CNCF distribution 2.8) for tests.

Why a real registry: the code under test drives ``skopeo``, and only a real
registry exercises the HTTP details that matter (blob mounts, chunked uploads,
auth challenges, TLS verification, a registry dying mid-push).

Usage::

    reg = start_registry(tmp_path / "reg", tls=True, auth=True)
    try:
        subprocess.run(["skopeo", "copy", *reg.tls_flags("dest"), src, reg.url("x/y:1")])
    finally:
        reg.stop()
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["Registry", "start_registry"]

READY_TIMEOUT = 15.0
POLL_INTERVAL = 0.05
STOP_TIMEOUT = 5.0
PORT_ATTEMPTS = 5

_PROXY_VARS = frozenset(
    v.lower() for v in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")
)

# docker-registry 2.8.2 writes two kinds of per-request lines into the same log:
#   * logrus:   time=... level=info msg="response completed" ... http.request.method=GET
#               http.request.uri=/v2/   (only for requests that reach the app; 401s and
#               some errors are logged differently or not at all)
#   * gorilla CombinedLoggingHandler (the "accesslog"), Apache combined format, for every
#     request, written after the handler returns:
#     127.0.0.1 - - [29/Nov/2026:12:16:13 +0000] "GET /v2/x/manifests/y?a=b HTTP/1.1" 404 91
#     "" "curl/7.88.1"     (one line; referer and user agent are quoted at the end)
# We count only the combined lines: one line per request, 401s included. Our own readiness
# probes carry PROBE_AGENT and are filtered out so request counts only see the test's traffic.
_ACCESS_RE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]+\] "(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" '
    r'(?P<status>\d{3}) (?P<size>\S+)(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?'
)
PROBE_AGENT = "cvmfs-inject-test-readiness-probe"


def _free_port() -> int:
    """Ask the kernel for an unused loopback port (racy, hence the retry in start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """Environment without proxy settings, so nothing local is routed through a proxy."""
    return {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}


def _run(cmd: list[str], cwd: Path, stdin: str | None = None) -> str:
    """Run a setup command; raise with its stderr so a broken fixture explains itself."""
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env=_clean_env(),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _make_certs(root: Path) -> tuple[Path, Path, Path]:
    """Create a CA and a CA-signed server cert for 127.0.0.1/localhost.

    Uses our own openssl config (not the system one) so the CA's basicConstraints and the
    server's SAN/AKI are explicit: Go and Python (X509_STRICT) both insist on them.
    Returns (ca_cert_in_cert_dir, server_cert, server_key).
    """
    tls = root / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    cert_dir = root / "certs"
    cert_dir.mkdir(parents=True, exist_ok=True)
    (tls / "ca.cnf").write_text(
        "[req]\nprompt = no\ndistinguished_name = dn\nx509_extensions = v3_ca\n"
        "[dn]\nCN = cvmfs-inject test CA\n"
        "[v3_ca]\nbasicConstraints = critical, CA:TRUE\n"
        "keyUsage = critical, keyCertSign, cRLSign\n"
        "subjectKeyIdentifier = hash\n"
    )
    (tls / "server.cnf").write_text(
        "[req]\nprompt = no\ndistinguished_name = dn\n[dn]\nCN = localhost\n"
    )
    (tls / "server.ext").write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run(
        ["openssl", "req", "-x509", *ec, "-config", "ca.cnf", "-days", "2",
         "-keyout", "ca.key", "-out", "ca.crt"],
        tls,
    )  # fmt: skip
    _run(
        ["openssl", "req", "-new", *ec, "-config", "server.cnf",
         "-keyout", "server.key", "-out", "server.csr"],
        tls,
    )  # fmt: skip
    _run(
        ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-set_serial", str(secrets.randbits(63)), "-days", "2", "-extfile", "server.ext",
         "-out", "server.crt"],
        tls,
    )  # fmt: skip
    ca = cert_dir / "ca.crt"
    shutil.copyfile(tls / "ca.crt", ca)
    return ca, tls / "server.crt", tls / "server.key"


def _htpasswd_line(user: str, password: str, cwd: Path) -> str:
    """A bcrypt htpasswd entry; the password goes via stdin, never argv."""
    if shutil.which("htpasswd"):
        out = _run(["htpasswd", "-niB", user], cwd, stdin=password + "\n")
        line = out.strip().splitlines()[0]
    else:
        try:
            import bcrypt  # type: ignore[import-not-found]
        except ImportError as exc:  # pragma: no cover - depends on the host
            raise RuntimeError("need htpasswd (apache2-utils) or python bcrypt") from exc
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        line = f"{user}:{hashed}"
    if not line.startswith(f"{user}:$2"):
        raise RuntimeError(f"unexpected htpasswd output: {line[: len(user) + 4]}...")
    return line


def _config_yaml(
    root: Path, port: int, tls: tuple[Path, Path] | None, htpasswd: Path | None
) -> str:
    """The registry config, written by hand (paths are JSON-quoted, which is valid YAML)."""
    q = json.dumps
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {q(str(root / 'storage'))}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: {q(f'127.0.0.1:{port}')}",
        f"  secret: {q(secrets.token_hex(16))}",
        "  headers:",
        "    X-Content-Type-Options: [nosniff]",
    ]
    if tls is not None:
        lines += [
            "  tls:",
            f"    certificate: {q(str(tls[0]))}",
            f"    key: {q(str(tls[1]))}",
        ]
    if htpasswd is not None:
        lines += [
            "auth:",
            "  htpasswd:",
            "    realm: cvmfs-inject-test",
            f"    path: {q(str(htpasswd))}",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Registry:
    """A running docker-registry plus everything a client needs to talk to it."""

    host: str
    tls: bool
    auth: tuple[str, str] | None
    cert_dir: Path | None
    authfile: Path | None
    root: Path
    log_path: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    # -- addressing -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def config_path(self) -> Path:
        return self.root / "config.yml"

    def url(self, repo: str) -> str:
        """skopeo transport reference, e.g. ``docker://127.0.0.1:5000/foo/bar:1``."""
        return f"docker://{self.host}/{repo}"

    def tls_flags(self, side: str = "") -> list[str]:
        """skopeo flags to reach this registry (TLS trust and credentials).

        ``side`` is "src" or "dest" for ``skopeo copy``/``sync``, "" for ``inspect`` and
        friends. Plain HTTP needs ``--*-tls-verify=false`` (that is what makes skopeo fall
        back to http://); TLS gets the CA via ``--*-cert-dir`` and keeps verification on.
        """
        if side not in ("src", "dest", ""):
            raise ValueError(f"side must be 'src', 'dest' or '', not {side!r}")
        p = f"--{side}-" if side else "--"
        flags = [f"{p}cert-dir", str(self.cert_dir)] if self.tls else [f"{p}tls-verify=false"]
        if self.authfile is not None:
            flags += [f"{p}authfile", str(self.authfile)]
        return flags

    # -- process control --------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(
            ["docker-registry", "serve", str(self.config_path)],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
            start_new_session=True,  # a Ctrl-C aimed at pytest must not hit it first
        )

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.cert_dir is not None
        return ssl.create_default_context(cafile=str(self.cert_dir / "ca.crt"))

    def get(
        self, path: str, *, auth: bool = True, timeout: float = 5.0, agent: str = "test"
    ) -> tuple[int, dict[str, str], bytes]:
        """Direct HTTP GET against the registry (no proxies), returning (status, headers, body).

        With ``auth=True`` basic credentials are sent when the registry has them.
        Raises OSError when the registry is down.
        """
        conn: http.client.HTTPConnection
        if self.tls:
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=timeout, context=self._ssl_context()
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Host": self.host, "User-Agent": agent}
        if auth and self.auth is not None:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def _wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                rc = self._proc.returncode if self._proc else None
                self.stop()
                raise RuntimeError(
                    f"docker-registry exited with {rc} during startup:\n{self.log_tail()}"
                )
            try:
                status, _, _ = self.get("/v2/", auth=False, timeout=1.0, agent=PROBE_AGENT)
                if status in (200, 401):
                    return
                last = RuntimeError(f"GET /v2/ -> {status}")
            except (OSError, http.client.HTTPException) as exc:
                last = exc
            time.sleep(POLL_INTERVAL)
        self.stop()
        raise RuntimeError(
            f"docker-registry on {self.host} not ready after {timeout}s ({last!r}):\n"
            f"{self.log_tail()}"
        )

    def _start(self) -> None:
        self._spawn()
        self._wait_ready()

    def stop(self) -> None:
        """Terminate the registry (SIGTERM, then SIGKILL); storage stays for restart()."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL at once: the registry gets no chance to finish in-flight requests."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        """Start again on the same port with the same storage, config and credentials."""
        self.stop()
        self._start()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- logs -------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def access_log(self) -> list[str]:
        """The Apache-combined access lines (one per request), in order of completion.

        Readiness probes from start/restart are left out.
        """
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for ln in text.splitlines():
            m = _ACCESS_RE.match(ln)
            if m and m["agent"] != PROBE_AGENT:
                out.append(ln)
        return out

    def requests(self, *, query: bool = False) -> list[tuple[str, str]]:
        """(METHOD, PATH) per request, e.g. ("HEAD", "/v2/foo/blobs/sha256:...").

        The query string is dropped unless ``query=True`` (upload PUTs carry ``?digest=``).
        """
        out: list[tuple[str, str]] = []
        for ln in self.access_log():
            m = _ACCESS_RE.match(ln)
            assert m is not None
            uri = m["uri"] if query else m["uri"].split("?", 1)[0]
            out.append((m["method"], uri))
        return out

    def requests_with_status(self) -> list[tuple[str, str, int]]:
        """(METHOD, PATH-with-query, STATUS) per request, for asserting on failures."""
        out: list[tuple[str, str, int]] = []
        for ln in self.access_log():
            m = _ACCESS_RE.match(ln)
            assert m is not None
            out.append((m["method"], m["uri"], int(m["status"])))
        return out

    def wait_for_request(self, method: str, path_re: str, timeout: float = 5.0) -> tuple[str, str]:
        """Wait until a matching access line appears.

        The access line is written after the handler returns, so a client may already
        hold the response (large blob GETs stream early) before the line is in the log.
        """
        pat = re.compile(path_re)
        deadline = time.monotonic() + timeout
        while True:
            for m, p in self.requests(query=True):
                if m == method and pat.search(p):
                    return m, p
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {method} {path_re} in access log:\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL)


def start_registry(root: Path, *, tls: bool = False, auth: bool = False) -> Registry:
    """Configure and start a docker-registry under ``root``; return once GET /v2/ answers.

    ``root`` gets config.yml, storage/, registry.log, and with tls certs/ca.crt (the
    skopeo --cert-dir), with auth htpasswd + auth.json (a containers-auth.json).
    """
    if shutil.which("docker-registry") is None:
        raise RuntimeError("docker-registry not on PATH")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "storage").mkdir(exist_ok=True)

    tls_files: tuple[Path, Path] | None = None
    cert_dir: Path | None = None
    if tls:
        ca, crt, key = _make_certs(root)
        tls_files = (crt, key)
        cert_dir = ca.parent

    creds: tuple[str, str] | None = None
    htpasswd: Path | None = None
    if auth:
        creds = ("tester", secrets.token_urlsafe(18))
        htpasswd = root / "htpasswd"
        htpasswd.write_text(_htpasswd_line(creds[0], creds[1], root) + "\n")
        htpasswd.chmod(0o600)

    last_err: RuntimeError | None = None
    for _ in range(PORT_ATTEMPTS):
        port = _free_port()
        host = f"127.0.0.1:{port}"
        authfile: Path | None = None
        if creds is not None:
            authfile = root / "auth.json"
            token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            authfile.write_text(json.dumps({"auths": {host: {"auth": token}}}, indent=2) + "\n")
            authfile.chmod(0o600)
        (root / "config.yml").write_text(_config_yaml(root, port, tls_files, htpasswd))
        (root / "registry.log").write_bytes(b"")  # so a stale failure can't match below
        reg = Registry(
            host=host,
            tls=tls,
            auth=creds,
            cert_dir=cert_dir,
            authfile=authfile,
            root=root,
            log_path=root / "registry.log",
        )
        try:
            reg._start()
            return reg
        except RuntimeError as exc:
            reg.stop()
            if "address already in use" not in str(exc):
                raise
            last_err = exc
    raise RuntimeError(f"no free port after {PORT_ATTEMPTS} attempts") from last_err
