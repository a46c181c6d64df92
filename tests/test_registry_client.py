"""RegistryClient against real docker-registries: uploads, mounts, manifests, auth, failures.

Every test uses its own repository names, so the session registries can be shared. What the
client did on the wire is checked in the registry's access log, not in the client.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import sha256, unique_repo
from registry import Registry

from cvmfs_inject.errors import (
    InputError,
    IntegrityError,
    NotFoundError,
    ToolError,
    UsageError,
)
from cvmfs_inject.registry.client import RegistryClient
from cvmfs_inject.registry.credentials import Credentials, load_credentials, read_credentials_stdin
from cvmfs_inject.registry.upload import with_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


# -- helpers ------------------------------------------------------------------------------


def new_repo(prefix: str) -> str:
    return unique_repo("rc", prefix)


def blob_file(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / f"blob-{uuid.uuid4().hex[:8]}"
    path.write_bytes(data)
    return path, sha256(data)


def plain(registry: Registry, **kwargs: Any) -> RegistryClient:
    return RegistryClient(registry.host, tls_verify=False, **kwargs)


def secure(reg: Registry, credentials: Credentials | None, **kwargs: Any) -> RegistryClient:
    return RegistryClient(reg.host, cert_dir=reg.cert_dir, credentials=credentials, **kwargs)


def repo_requests(registry: Registry, repo: str, since: int = 0) -> list[tuple[str, str]]:
    """(METHOD, PATH?QUERY) of the requests for `repo`, from access line `since` on."""
    return [(m, p) for m, p in registry.requests(query=True)[since:]
            if p.startswith(f"/v2/{repo}/")]


def methods(reqs: list[tuple[str, str]], method: str) -> list[str]:
    return [p for m, p in reqs if m == method]


def wait_for_lines(registry: Registry, repo: str, method: str, count: int) -> None:
    """Wait for `count` access lines: a GET streaming a big body is logged after it ends."""
    deadline = time.monotonic() + 5
    while len(methods(repo_requests(registry, repo), method)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} {method} lines for {repo}"
        time.sleep(0.02)


def blob_data_path(reg: Registry, digest: str) -> Path:
    """Where docker-registry's filesystem driver keeps a blob's bytes."""
    hexdigest = digest.split(":", 1)[1]
    return (reg.root / "storage" / "docker" / "registry" / "v2" / "blobs" / "sha256"
            / hexdigest[:2] / hexdigest / "data")


def corrupt_in_storage(reg: Registry, digest: str, old: bytes, new: bytes) -> None:
    """Change stored bytes behind the registry's back (same length, so sizes still match)."""
    assert len(old) == len(new)
    path = blob_data_path(reg, digest)
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def image_blobs(tmp_path: Path, config_type: str) -> tuple[tuple[Path, str, int], ...]:
    """A gzipped one-file layer and an image config for it, as files to push."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        content = f"hello {uuid.uuid4().hex}\n".encode()
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mode, info.mtime = len(content), 0o644, 0
        tar.addfile(info, io.BytesIO(content))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(raw.getvalue())]},
    }).encode()
    assert config_type  # the config bytes are the same for both families
    out = []
    for data in (layer, config):
        path, digest = blob_file(tmp_path, data)
        out.append((path, digest, len(data)))
    return tuple(out)


def push_image(client: RegistryClient, repo: str, tmp_path: Path, media_type: str,
               config_type: str, layer_type: str, note: str) -> bytes:
    """Push a fresh layer and config to repo; the manifest bytes for them (not pushed)."""
    layer, config = image_blobs(tmp_path, config_type)
    for path, digest, size in (layer, config):
        client.push_blob(repo, path, digest, size)
    return make_manifest(media_type, config[1:], config_type, layer[1:], layer_type, note)


def make_manifest(media_type: str, config: tuple[str, int], config_type: str,
                  layer: tuple[str, int], layer_type: str, note: str) -> bytes:
    """Manifest bytes deliberately not in canonical form: they must come back byte-exact."""
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config_type, "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": layer_type, "digest": layer[0], "size": layer[1]}],
    }
    if media_type == OCI_MANIFEST:
        doc["annotations"] = {"note": note}
    else:
        doc["layers"][0]["urls"] = [f"https://example.invalid/{note}"]
    return json.dumps(doc, indent=3).encode() + b"\n"


@pytest.fixture
def clean_auth_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A HOME without auth files and no auth-related variables; returns that HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return home


def write_json(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


# -- uploads and downloads on the plain registry --------------------------------------------


@pytest.mark.registry
def test_monolithic_push_is_one_put_and_reads_back(registry: Registry, tmp_path: Path) -> None:
    repo = new_repo("mono")
    data = os.urandom(10_000)
    path, digest = blob_file(tmp_path, data)
    client = plain(registry)

    client.push_blob(repo, path, digest, len(data))

    reqs = repo_requests(registry, repo)
    assert methods(reqs, "POST") == [f"/v2/{repo}/blobs/uploads/"]
    puts = methods(reqs, "PUT")
    assert len(puts) == 1 and f"digest={digest.replace(':', '%3A')}" in puts[0]
    assert methods(reqs, "PATCH") == []
    assert client.has_blob(repo, digest)
    assert client.get_blob(repo, digest, len(data)) == data
    assert b"".join(client.open_blob(repo, digest)) == data

    # Pushing it again is only the HEAD that finds it.
    wait_for_lines(registry, repo, "GET", 2)
    since = len(registry.requests())
    client.push_blob(repo, path, digest, len(data))
    assert [m for m, _ in repo_requests(registry, repo, since)] == ["HEAD"]


@pytest.mark.registry
def test_chunked_push_uses_patches_then_one_put(registry: Registry, tmp_path: Path) -> None:
    repo = new_repo("chunked")
    data = os.urandom(50_000)
    path, digest = blob_file(tmp_path, data)
    client = plain(registry, monolithic_limit=1024, chunk_size=4096)

    client.push_blob(repo, path, digest, len(data))

    reqs = repo_requests(registry, repo)
    patches = methods(reqs, "PATCH")
    assert len(patches) == -(-len(data) // 4096)  # 13 chunks of at most 4096 bytes
    puts = methods(reqs, "PUT")
    assert len(puts) == 1 and "digest=" in puts[0]
    order = [m for m, _ in reqs]
    assert order.index("PUT") > len(order) - 1 - order[::-1].index("PATCH")
    assert client.has_blob(repo, digest)
    assert client.get_blob(repo, digest) == data
    chunks = list(client.open_blob(repo, digest))
    assert b"".join(chunks) == data


@pytest.mark.registry
def test_empty_blob_round_trip(registry: Registry, tmp_path: Path) -> None:
    repo = new_repo("empty")
    path, digest = blob_file(tmp_path, b"")
    client = plain(registry)
    client.push_blob(repo, path, digest, 0)
    assert client.get_blob(repo, digest, 0) == b""


@pytest.mark.registry
def test_push_rejects_a_file_that_does_not_match(registry: Registry, tmp_path: Path) -> None:
    repo = new_repo("mismatch")
    path, _ = blob_file(tmp_path, b"actual content")
    wrong = sha256(b"other content!")
    with pytest.raises(IntegrityError, match="does not match"):
        plain(registry).push_blob(repo, path, wrong, len(b"actual content"))
    with pytest.raises(IntegrityError, match="does not match"):
        plain(registry, monolithic_limit=0, chunk_size=4).push_blob(
            repo, path, wrong, len(b"actual content"))
    with pytest.raises(IntegrityError, match="bytes"):
        plain(registry).push_blob(repo, path, wrong, 999)
    assert not plain(registry).has_blob(repo, wrong)


@pytest.mark.registry
def test_mount_across_repositories(registry: Registry, tmp_path: Path) -> None:
    src, dst = new_repo("mount-src"), new_repo("mount-dst")
    data = os.urandom(20_000)
    path, digest = blob_file(tmp_path, data)
    client = plain(registry)
    client.push_blob(src, path, digest, len(data))

    assert client.mount_blob(dst, digest, src) is True

    reqs = repo_requests(registry, dst)
    posts = methods(reqs, "POST")
    assert len(posts) == 1 and "mount=" in posts[0] and f"from={src}" in posts[0]
    assert methods(reqs, "PATCH") == [] and methods(reqs, "PUT") == []
    assert client.has_blob(dst, digest)
    assert client.get_blob(dst, digest, len(data)) == data


@pytest.mark.registry
def test_refused_mount_leaves_no_upload_behind(registry: Registry, tmp_path: Path) -> None:
    src, dst = new_repo("nomount-src"), new_repo("nomount-dst")
    client = plain(registry)
    path, present = blob_file(tmp_path, os.urandom(100))
    client.push_blob(src, path, present, 100)
    unknown = sha256(os.urandom(64))

    assert client.mount_blob(dst, unknown, src) is False

    statuses = [(m, p.split("?", 1)[0], s) for m, p, s in registry.requests_with_status()
                if p.startswith(f"/v2/{dst}/")]
    assert [(m, s) for m, _, s in statuses] == [("POST", 202), ("DELETE", 204)]
    assert statuses[1][1].startswith(f"/v2/{dst}/blobs/uploads/")
    # The registry no longer knows the session; docker-registry 2.8 only leaves the
    # resumable hash state files behind (its own Cancel does that), no data or startedat.
    status, _, _ = registry.get(statuses[1][1])
    assert status == 404
    uploads = (registry.root / "storage" / "docker" / "registry" / "v2" / "repositories"
               / dst / "_uploads")
    left = {p.name for p in uploads.rglob("*") if p.is_file()} if uploads.exists() else set()
    assert not left & {"data", "startedat"}
    assert not client.has_blob(dst, unknown)


@pytest.mark.registry
def test_copy_blob_between_registries_streams_in_chunks(
        registry: Registry, secure_registry: Registry, tmp_path: Path) -> None:
    src, dst = new_repo("copy-src"), new_repo("copy-dst")
    data = os.urandom(300_000)
    path, digest = blob_file(tmp_path, data)
    source = plain(registry)
    source.push_blob(src, path, digest, len(data))
    creds = Credentials(*secure_registry.auth)  # type: ignore[misc]
    dest = secure(secure_registry, creds, monolithic_limit=1024, chunk_size=64 << 10)

    dest.copy_blob_from(source, src, dst, digest, len(data))

    assert len(methods(repo_requests(secure_registry, dst), "PATCH")) == 5
    assert dest.get_blob(dst, digest, len(data)) == data
    # Already there: nothing is downloaded again.
    wait_for_lines(registry, src, "GET", 1)
    since = len(registry.requests())
    dest.copy_blob_from(source, src, dst, digest, len(data))
    assert repo_requests(registry, src, since) == []


# -- manifests -------------------------------------------------------------------------------


@pytest.mark.registry
@pytest.mark.parametrize(
    ("media_type", "config_type", "layer_type"),
    [(OCI_MANIFEST, OCI_CONFIG, OCI_LAYER), (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)],
    ids=["oci", "docker"],
)
def test_manifest_round_trip_keeps_bytes_and_type(
        registry: Registry, tmp_path: Path, media_type: str, config_type: str,
        layer_type: str) -> None:
    repo = new_repo("manifest")
    client = plain(registry)
    raw = push_image(client, repo, tmp_path, media_type, config_type, layer_type, "aaaa")

    digest = client.put_manifest(repo, "v1", raw, media_type)

    assert digest == sha256(raw)
    assert client.get_manifest(repo, "v1") == (raw, media_type, digest)
    assert client.get_manifest(repo, digest) == (raw, media_type, digest)
    skopeo = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false",
         f"docker://{registry.host}/{repo}:v1"],
        capture_output=True, check=False, timeout=60)
    assert skopeo.returncode == 0, skopeo.stderr.decode(errors="replace")
    assert skopeo.stdout == raw
    # Pushing the same bytes by digest is accepted and gives the same digest.
    assert client.put_manifest(repo, digest, raw, media_type) == digest
    with pytest.raises(InputError, match="declares mediaType"):
        other = OCI_MANIFEST if media_type == DOCKER_MANIFEST else DOCKER_MANIFEST
        client.put_manifest(repo, "v2", raw, other)


@pytest.mark.registry
def test_corrupted_manifest_in_registry_is_detected(registry: Registry, tmp_path: Path) -> None:
    repo = new_repo("badmanifest")
    client = plain(registry)
    raw = push_image(client, repo, tmp_path, OCI_MANIFEST, OCI_CONFIG, OCI_LAYER, "aaaa")
    digest = client.put_manifest(repo, "v1", raw, OCI_MANIFEST)

    corrupt_in_storage(registry, digest, b'"aaaa"', b'"bbbb"')

    with pytest.raises(InputError, match="not the one requested"):
        client.get_manifest(repo, digest)


@pytest.mark.registry
def test_not_found_and_integrity_errors(registry: Registry, tmp_path: Path) -> None:
    repo = new_repo("errors")
    client = plain(registry)
    data = os.urandom(5000)
    path, digest = blob_file(tmp_path, data)
    client.push_blob(repo, path, digest, len(data))

    with pytest.raises(NotFoundError, match=f"{repo}:nope"):
        client.get_manifest(repo, "nope")
    with pytest.raises(NotFoundError, match="not found"):
        client.get_blob(repo, sha256(b"never pushed"))
    with pytest.raises(IntegrityError, match="expected 4999"):
        client.get_blob(repo, digest, 4999)
    with pytest.raises(IntegrityError, match="expected 5001"):
        client.get_blob(repo, digest, 5001)
    with pytest.raises(InputError, match="invalid digest"):
        client.get_blob(repo, "sha256:XYZ")
    assert not client.has_blob(repo, sha256(b"never pushed"))

    # Bytes changed in the registry's storage: both readers notice.
    corrupt_in_storage(registry, digest, data[100:104], bytes(b ^ 0xFF for b in data[100:104]))
    with pytest.raises(IntegrityError, match="corrupted"):
        client.get_blob(repo, digest, len(data))
    with pytest.raises(IntegrityError, match="corrupted"):
        b"".join(client.open_blob(repo, digest))


# -- TLS and authentication ------------------------------------------------------------------


@pytest.mark.registry
def test_secure_registry_with_authfile_credentials(
        secure_registry: Registry, tmp_path: Path) -> None:
    creds = load_credentials(secure_registry.host, secure_registry.authfile)
    assert creds == Credentials(*secure_registry.auth)  # type: ignore[misc]
    repo = new_repo("secure")
    client = secure(secure_registry, creds, monolithic_limit=2048, chunk_size=8192)
    small, small_digest = blob_file(tmp_path, os.urandom(1000))
    big_data = os.urandom(40_000)
    big, big_digest = blob_file(tmp_path, big_data)

    client.push_blob(repo, small, small_digest, 1000)
    client.push_blob(repo, big, big_digest, len(big_data))

    assert client.get_blob(repo, big_digest) == big_data
    assert client.mount_blob(new_repo("secure-mount"), big_digest, repo)
    raw = push_image(client, repo, tmp_path, DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER, "x")
    digest = client.put_manifest(repo, "1", raw, DOCKER_MANIFEST)
    assert client.get_manifest(repo, "1") == (raw, DOCKER_MANIFEST, digest)
    assert len(methods(repo_requests(secure_registry, repo), "PATCH")) == 5


@pytest.mark.registry
def test_secure_registry_without_credentials(secure_registry: Registry) -> None:
    client = secure(secure_registry, None)
    with pytest.raises(ToolError, match=r"authentication failed \(401\)") as err:
        client.get_manifest(new_repo("anon"), "latest")
    assert secure_registry.host in str(err.value)


@pytest.mark.registry
def test_wrong_password_is_rejected_and_never_shown(
        secure_registry: Registry, tmp_path: Path) -> None:
    user, password = secure_registry.auth  # type: ignore[misc]
    wrong = "wrong-" + uuid.uuid4().hex
    path, digest = blob_file(tmp_path, b"data")
    for pw in (wrong, password):
        client = secure(secure_registry, Credentials(user, pw))
        assert pw not in repr(client)
        assert pw not in repr(Credentials(user, pw))
    client = secure(secure_registry, Credentials(user, wrong))
    with pytest.raises(ToolError, match="authentication failed") as err:
        client.push_blob(new_repo("wrongpw"), path, digest, 4)
    assert wrong not in str(err.value) and password not in str(err.value)
    assert "--authfile" in str(err.value)


@pytest.mark.registry
def test_tls_failures_point_to_cert_dir(secure_registry: Registry) -> None:
    creds = Credentials(*secure_registry.auth)  # type: ignore[misc]
    with pytest.raises(ToolError, match="--cert-dir") as err:
        RegistryClient(secure_registry.host, credentials=creds).has_blob("x/y", sha256(b""))
    assert "--no-tls-verify" in str(err.value)
    with pytest.raises(ToolError, match="https"):
        RegistryClient(secure_registry.host, tls_verify=False, credentials=creds).has_blob(
            "x/y", sha256(b""))


# -- credentials -----------------------------------------------------------------------------


def test_credentials_from_auth_and_username_password(
        clean_auth_env: Path, tmp_path: Path) -> None:
    authfile = write_json(tmp_path / "auth.json", {"auths": {
        "reg.example:5000": {"auth": b64("alice:pa:ss")},
        "https://other.example": {"username": "bob", "password": "pw2"},
        "third.example/team": {"auth": b64("scoped:no")},
    }})
    assert load_credentials("reg.example:5000", authfile) == Credentials("alice", "pa:ss")
    assert load_credentials("other.example", authfile) == Credentials("bob", "pw2")
    assert load_credentials("third.example", authfile) is None
    assert load_credentials("unknown.example", authfile) is None
    with pytest.raises(InputError, match="does not exist"):
        load_credentials("reg.example:5000", tmp_path / "missing.json")
    assert "pa:ss" not in repr(Credentials("alice", "pa:ss"))


def test_credentials_default_file_order(
        clean_auth_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docker_dir = tmp_path / "docker"
    write_json(docker_dir / "config.json", {"auths": {
        "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpw")},
        "reg.example": {"auth": b64("docker:1")},
    }})
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    assert load_credentials("docker.io") == Credentials("hubuser", "hubpw")
    assert load_credentials("reg.example") == Credentials("docker", "1")

    write_json(clean_auth_env / ".config" / "containers" / "auth.json",
               {"auths": {"reg.example": {"auth": b64("home:2")}}})
    assert load_credentials("reg.example") == Credentials("home", "2")

    runtime = tmp_path / "run"
    write_json(runtime / "containers" / "auth.json",
               {"auths": {"http://reg.example": {"auth": b64("xdg:3")}}})
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert load_credentials("reg.example") == Credentials("xdg", "3")

    env_file = write_json(tmp_path / "env-auth.json",
                          {"auths": {"reg.example": {"auth": b64("env:4")}}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(env_file))
    assert load_credentials("reg.example") == Credentials("env", "4")
    # An explicit file is the only one consulted.
    empty = write_json(tmp_path / "empty.json", {"auths": {}})
    assert load_credentials("reg.example", empty) is None


def test_credentials_from_helper_program(
        clean_auth_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    helper.write_text(textwrap.dedent("""\
        #!/bin/sh
        [ "$1" = get ] || exit 2
        read -r server
        case "$server" in
          reg.example:5000)
            printf '{"ServerURL":"%s","Username":"helper-user","Secret":"helper-secret"}' \\
              "$server" ;;
          https://index.docker.io/v1/)
            printf '{"ServerURL":"%s","Username":"hub","Secret":"hub-secret"}' "$server" ;;
          *) echo "credentials not found in native keychain"; exit 1 ;;
        esac
        """))
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    helpers = write_json(tmp_path / "helpers.json", {
        "auths": {"reg.example:5000": {}},
        "credHelpers": {"reg.example:5000": "fake", "gone.example": "missing"},
    })
    assert load_credentials("reg.example:5000", helpers) == Credentials(
        "helper-user", "helper-secret")
    with pytest.raises(ToolError, match="docker-credential-missing") as err:
        load_credentials("gone.example", helpers)
    assert "helper-secret" not in str(err.value)

    store = write_json(tmp_path / "store.json", {"credsStore": "fake"})
    assert load_credentials("docker.io", store) == Credentials("hub", "hub-secret")
    assert load_credentials("unknown.example", store) is None


def test_read_credentials_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("alice:s3cret with: space\nsecond line\n"))
    creds = read_credentials_stdin()
    assert creds == Credentials("alice", "s3cret with: space")
    assert "s3cret" not in repr(creds)


@pytest.mark.parametrize("line", ["no-colon\n", ":password\n", "user:\n", ""])
def test_read_credentials_stdin_refuses_malformed_lines(monkeypatch: pytest.MonkeyPatch,
                                                       line: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(line))
    with pytest.raises(UsageError, match="USERNAME:PASSWORD"):
        read_credentials_stdin()


# -- failures and resources ------------------------------------------------------------------


@pytest.mark.registry
def test_registry_dying_mid_upload_fails_quickly(registry: Registry, tmp_path: Path) -> None:
    repo = new_repo("dying")
    data = os.urandom(2 << 20)
    path, digest = blob_file(tmp_path, data)
    client = plain(registry, chunk_size=64 << 10, monolithic_limit=0, retries=1)
    patches: list[int] = []

    def stop_after_third_patch(resp: Any, *args: Any, **kwargs: Any) -> None:
        if resp.request.method == "PATCH":
            patches.append(resp.status_code)
            if len(patches) == 3:
                registry.stop()

    client.session.hooks["response"].append(stop_after_third_patch)
    start = time.monotonic()
    try:
        with pytest.raises(ToolError) as err:
            client.push_blob(repo, path, digest, len(data))
        elapsed = time.monotonic() - start
    finally:
        registry.restart()  # the registry fixture is shared by the whole session

    message = str(err.value)
    assert f"upload of {digest}" in message and "unreachable" in message
    assert patches == [202, 202, 202]
    assert elapsed < 10
    # Back up: a fresh push of the same blob works.
    again = plain(registry, chunk_size=256 << 10, monolithic_limit=0)
    again.push_blob(repo, path, digest, len(data))
    assert again.get_blob(repo, digest, len(data)) == data


_MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from cvmfs_inject.registry.client import RegistryClient

host, repo, path, digest, size = sys.argv[1:6]
client = RegistryClient(host, tls_verify=False)
client.has_blob(repo, digest)  # imports, session and connection are set up before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
client.push_blob(repo, Path(path), digest, int(size))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


@pytest.mark.registry
def test_chunked_push_of_200mb_keeps_memory_flat(registry: Registry, tmp_path: Path) -> None:
    size = 200 << 20
    path = tmp_path / "big.bin"
    with path.open("wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(size)
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            hasher.update(block)
    digest = "sha256:" + hasher.hexdigest()
    repo = new_repo("big")

    # A child process, so the peak RSS is this push's and not an earlier test's.
    probe = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, registry.host, repo, str(path), digest,
         str(size)], capture_output=True, text=True, check=False, timeout=300)
    try:
        assert probe.returncode == 0, probe.stderr
        rss = json.loads(probe.stdout)
        growth_mib = (rss["after_kib"] - rss["before_kib"]) / 1024
        assert growth_mib < 60, f"peak RSS grew by {growth_mib:.0f} MiB"
        assert len(methods(repo_requests(registry, repo), "PATCH")) == -(-size // (16 << 20))
        assert plain(registry).has_blob(repo, digest)
    finally:
        data = blob_data_path(registry, digest)
        if data.exists():
            data.unlink()  # 200 MB of disk; nothing else uses this digest


@pytest.mark.parametrize(("location", "expected"), [
    ("http://r/v2/a/blobs/uploads/u1", "http://r/v2/a/blobs/uploads/u1?digest=sha256%3Aab"),
    ("/v2/a/blobs/uploads/u1?_state=x%3Dy&empty=",
     "/v2/a/blobs/uploads/u1?_state=x%3Dy&empty=&digest=sha256%3Aab"),
    ("/u?digest=sha256%3Aold&b=1", "/u?b=1&digest=sha256%3Aab"),
])
def test_upload_location_gets_the_digest_beside_the_registry_state(location: str,
                                                                   expected: str) -> None:
    assert with_digest(location, "sha256:ab") == expected
