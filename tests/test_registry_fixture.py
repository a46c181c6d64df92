"""Prove tests/registry.py starts real registries that skopeo can push to and read from."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from registry import Registry, start_registry

pytestmark = pytest.mark.registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    """Store ``data`` as a content-addressed blob; return its (partial) descriptor."""
    digest = hashlib.sha256(data).hexdigest()
    d = layout / "blobs" / "sha256"
    d.mkdir(parents=True, exist_ok=True)
    (d / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_oci_layout(layout: Path, tag: str = "1") -> str:
    """Write a one-layer OCI image layout by hand; return the manifest digest.

    Built in-process so this test depends only on the registry and skopeo.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        content = b"hello from cvmfs-inject\n"
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mode, info.mtime = len(content), 0o644, 0
        tar.addfile(info, io.BytesIO(content))
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    layer = _blob(layout, gzip.compress(raw.getvalue(), mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    cfg = _blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }
    man = _blob(layout, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                **man,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return str(man["digest"])


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["skopeo", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"skopeo {' '.join(args)} failed:\n{proc.stderr}"
    return proc


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Registry]:
    reg = start_registry(tmp_path / "plain")
    yield reg
    reg.stop()


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Registry]:
    reg = start_registry(tmp_path / "secure", tls=True, auth=True)
    yield reg
    reg.stop()


def test_plain_answers_v2(plain: Registry) -> None:
    status, headers, _ = plain.get("/v2/")
    assert status == 200
    assert headers.get("Docker-Distribution-Api-Version") == "registry/2.0"
    assert plain.tls_flags("src") == ["--src-tls-verify=false"]
    assert plain.wait_for_request("GET", r"^/v2/$")
    # the readiness probes are filtered out: only our one GET is counted
    assert plain.requests() == [("GET", "/v2/")]


def test_tls_auth_v2(secure: Registry) -> None:
    assert secure.cert_dir is not None and (secure.cert_dir / "ca.crt").is_file()
    assert secure.authfile is not None
    assert secure.host in json.loads(secure.authfile.read_text())["auths"]
    assert secure.get("/v2/")[0] == 200
    status, headers, _ = secure.get("/v2/", auth=False)
    assert status == 401
    assert headers.get("Www-Authenticate", "").startswith("Basic ")
    assert secure.tls_flags("") == [
        "--cert-dir", str(secure.cert_dir), "--authfile", str(secure.authfile),
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["plain", "secure"])
def test_skopeo_roundtrip_stop_restart(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    reg: Registry = request.getfixturevalue(kind)
    layout = tmp_path / "oci"
    digest = make_oci_layout(layout)

    skopeo("copy", "--retry-times", "0", *reg.tls_flags("dest"),
           f"oci:{layout}:1", reg.url("test/img:1"))  # fmt: skip
    raw = skopeo("inspect", "--raw", *reg.tls_flags(""), reg.url("test/img:1")).stdout
    manifest = json.loads(raw)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == digest

    reg.wait_for_request("PUT", r"^/v2/test/img/manifests/1$")
    assert ("PUT", "/v2/test/img/manifests/1") in reg.requests()
    assert any(m == "PUT" and "digest=sha256" in p for m, p in reg.requests(query=True))

    reg.stop()
    assert not reg.running
    with pytest.raises(OSError):
        reg.get("/v2/", timeout=2)

    reg.restart()
    assert reg.get("/v2/")[0] == 200
    raw2 = skopeo("inspect", "--raw", *reg.tls_flags(""), reg.url("test/img:1")).stdout
    assert json.loads(raw2) == manifest
