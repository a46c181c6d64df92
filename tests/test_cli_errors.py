"""Every user-facing error: the documented exit code, one `cvmfs-inject: error:` line naming
what and where, no traceback, and a layout that is byte-for-byte what it was before.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import dir_bytes, unique_repo

from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.layout.store import Layout

USAGE, INPUT, NOT_FOUND, INTEGRITY, TOOL, LOCKED, MISSING, INVALID = 2, 3, 4, 5, 6, 7, 8, 1
PREFIX = "cvmfs-inject: error: "
REF_NAME = "org.opencontainers.image.ref.name"


# -- helpers ------------------------------------------------------------------------------


def one_error(res: Any, code: int, *needles: str) -> str:
    """Exit `code`, stderr exactly one error line containing every needle; return the line."""
    assert "Traceback" not in res.err, res.err
    assert res.code == code, f"exit {res.code}, wanted {code}\nstdout: {res.out}\nstderr: {res.err}"
    lines = res.err.splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{res.err}"
    line = lines[0]
    assert line.startswith(PREFIX), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def validate_failed(res: Any, *needles: str) -> str:
    """validate's failure: problems on stderr, then one final error line; exit 1."""
    assert "Traceback" not in res.err, res.err
    assert res.code == INVALID, f"exit {res.code}\nstdout: {res.out}\nstderr: {res.err}"
    lines = res.err.splitlines()
    assert lines, "no problems reported"
    assert lines[-1].startswith(PREFIX), lines[-1]
    assert "problem" in lines[-1]
    assert sum(line.startswith(PREFIX) for line in lines) == 1, res.err
    for needle in needles:
        assert needle in res.err, f"{needle!r} not in {res.err!r}"
    return res.err


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def repo(prefix: str) -> str:
    return unique_repo("errors", prefix)


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, encoded = digest.split(":", 1)
    return layout / "blobs" / algorithm / encoded


def read_doc(layout: Path, digest: str) -> dict[str, Any]:
    return json.loads(blob_path(layout, digest).read_bytes())


@pytest.fixture
def sample(tmp_path: Path) -> tuple[Path, Any]:
    """A one-platform, two-layer OCI image under tag v1 (and v2, the same image)."""
    layout = tmp_path / "layout"
    top = build_sample_image(layout, "v1", platforms=("amd64",))
    build_sample_image(layout, "v2", platforms=("amd64",))
    return layout, top


@pytest.fixture
def no_default_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials from the environment: skopeo's default auth lookups see empty dirs."""
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    empty = tmp_path / "empty-auth"
    empty.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(empty))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(empty))


# -- bad references -----------------------------------------------------------------------

BAD_REFS = [
    ("docker:/x", "docker://"),
    ("docker://UPPER/x", "lowercase"),
    ("oci:", "needs a path"),
    ("foo://x", "unknown transport 'foo'"),
]


@pytest.mark.parametrize(("ref", "why"), BAD_REFS)
def test_bad_reference_as_source(cli, tmp_path, ref, why):
    dest = tmp_path / "new-layout"
    line = one_error(cli("pull", ref, dest), USAGE, repr(ref), why)
    # says which forms are accepted
    assert "expected docker://HOST/REPO" in line
    assert "oci:DIR" in line
    assert not dest.exists()


@pytest.mark.parametrize(("ref", "why"), BAD_REFS)
def test_bad_reference_as_destination(cli, sample, ref, why):
    layout, _ = sample
    before = dir_bytes(layout)
    one_error(cli("push", f"{layout}:v1", ref), USAGE, repr(ref), why, "expected")
    assert dir_bytes(layout) == before


@pytest.mark.parametrize(("ref", "why"), BAD_REFS)
def test_bad_reference_to_inspect(cli, ref, why):
    one_error(cli("inspect", ref), USAGE, repr(ref), why, "expected")


def test_push_to_a_layout_is_a_usage_error(cli, sample, tmp_path):
    layout, _ = sample
    before = dir_bytes(layout)
    one_error(cli("push", f"{layout}:v1", f"oci:{tmp_path / 'other'}"), USAGE, "oci:")
    assert dir_bytes(layout) == before
    assert not (tmp_path / "other").exists()


# -- registries: unreachable, 401, unknown tag --------------------------------------------


def test_unreachable_registry(cli, tmp_path):
    host = f"127.0.0.1:{free_port()}"
    dest = tmp_path / "new"
    line = one_error(cli("pull", "--no-tls-verify", f"docker://{host}/x/y:1", dest), TOOL,
                     host)
    assert "unreachable" in line or "connection refused" in line
    assert not dest.exists()


def test_unreachable_registry_on_push_leaves_layout(cli, sample):
    layout, _ = sample
    before = dir_bytes(layout)
    host = f"127.0.0.1:{free_port()}"
    one_error(cli("push", "--no-tls-verify", f"{layout}:v1", f"docker://{host}/x/y:1"), TOOL,
              host)
    assert dir_bytes(layout) == before


@pytest.mark.registry
def test_401_without_credentials(cli, secure_registry, tmp_path, no_default_auth):
    reg = secure_registry
    dest = tmp_path / "new"
    line = one_error(cli("pull", "--cert-dir", reg.cert_dir,
                         f"docker://{reg.host}/{repo('noauth')}:1", dest), TOOL,
                     "authentication", reg.host)
    assert "--authfile" in line
    assert not dest.exists()


@pytest.mark.registry
def test_401_without_credentials_on_push(cli, secure_registry, sample, no_default_auth):
    reg = secure_registry
    layout, _ = sample
    before = dir_bytes(layout)
    one_error(cli("push", "--cert-dir", reg.cert_dir, f"{layout}:v1",
                  f"docker://{reg.host}/{repo('noauth-push')}:1"), TOOL, "authentication")
    assert dir_bytes(layout) == before


@pytest.mark.registry
def test_401_wrong_password(cli, secure_registry, tmp_path, no_default_auth):
    reg = secure_registry
    assert reg.auth is not None
    wrong = tmp_path / "auth.json"
    token = base64.b64encode(f"{reg.auth[0]}:not-the-password".encode()).decode()
    wrong.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
    dest = tmp_path / "new"
    line = one_error(cli("pull", "--cert-dir", reg.cert_dir, "--authfile", wrong,
                         f"docker://{reg.host}/{repo('wrongpw')}:1", dest), TOOL,
                     "authentication", reg.host)
    assert "not-the-password" not in line and token not in line
    assert not dest.exists()


@pytest.mark.registry
@pytest.mark.parametrize("command", ["inspect", "unpack"])
def test_https_to_a_plain_http_registry_says_use_no_tls_verify(cli, registry, tmp_path,
                                                               command):
    """Registry-direct commands say what skopeo's path says: the registry speaks http."""
    ref = f"docker://{registry.host}/{repo('plain')}:1"
    args = [ref] if command == "inspect" else [ref, tmp_path / "out"]
    one_error(cli(command, *args), TOOL, "speaks plain http", "--no-tls-verify")
    assert not (tmp_path / "out").exists()


@pytest.mark.registry
def test_tls_without_ca_is_a_tool_error(cli, secure_registry, tmp_path):
    reg = secure_registry
    one_error(cli("pull", "--authfile", reg.authfile, f"docker://{reg.host}/{repo('tls')}:1",
                  tmp_path / "new"), TOOL, "TLS", "--cert-dir")
    assert not (tmp_path / "new").exists()


@pytest.mark.registry
def test_unknown_tag_on_registry(cli, registry, sample, tmp_path):
    layout, _ = sample
    name = repo("tags")
    assert cli("push", "--no-tls-verify", f"{layout}:v1",
               f"docker://{registry.host}/{name}:v1").code == 0
    dest = tmp_path / "new"
    one_error(cli("pull", "--no-tls-verify", f"docker://{registry.host}/{name}:nope", dest),
              NOT_FOUND, "nope", name)
    assert not dest.exists()
    one_error(cli("inspect", "--no-tls-verify", f"docker://{registry.host}/{name}:nope"),
              NOT_FOUND, "nope")


@pytest.mark.registry
def test_unknown_tag_on_registry_into_existing_layout(cli, registry, sample):
    layout, _ = sample
    before = dir_bytes(layout)
    one_error(cli("pull", "--no-tls-verify", f"docker://{registry.host}/{repo('none')}:x",
                  f"{layout}:new"), NOT_FOUND)
    assert dir_bytes(layout) == before


def test_unknown_tag_in_layout(cli, sample, tmp_path):
    layout, _ = sample
    before = dir_bytes(layout)
    for args in (("inspect", f"{layout}:nope"),
                 ("push", f"{layout}:nope", f"oci-archive:{tmp_path / 'out.tar'}"),
                 ("validate", f"{layout}:nope")):
        one_error(cli(*args), NOT_FOUND, "'nope'", str(layout), "v1", "v2")
    assert dir_bytes(layout) == before
    assert not (tmp_path / "out.tar").exists()


def test_unknown_tag_in_layout_as_pull_source(cli, sample, tmp_path):
    """Pulling from a local layout names the missing tag and the tags there are, like inspect."""
    layout, _ = sample
    before = dir_bytes(layout)
    dest = tmp_path / "new"
    one_error(cli("pull", f"oci:{layout}:nope", dest), NOT_FOUND, "nope", str(layout), "v1",
              "v2")
    assert not dest.exists()
    assert dir_bytes(layout) == before


def test_json_mode_error_keeps_stdout_empty(cli, sample):
    layout, _ = sample
    res = cli("--json", "inspect", f"{layout}:nope")
    one_error(res, NOT_FOUND, "'nope'")
    assert res.out == ""


# -- invalid JSON, schema violations -------------------------------------------------------


def test_truncated_index_json(cli, sample, tmp_path):
    layout, _ = sample
    index = layout / "index.json"
    index.write_bytes(index.read_bytes()[: len(index.read_bytes()) // 2])
    before = dir_bytes(layout)
    for args in (("inspect", f"{layout}:v1"), ("inspect", layout), ("gc", layout),
                 ("push", f"{layout}:v1", f"oci-archive:{tmp_path / 'out.tar'}")):
        line = one_error(cli(*args), INPUT, str(index))
        assert "invalid JSON" in line
        assert dir_bytes(layout) == before
    assert not (tmp_path / "out.tar").exists()
    validate_failed(cli("validate", layout), str(index), "invalid JSON")
    assert dir_bytes(layout) == before


def test_manifest_blob_with_invalid_json(cli, sample):
    """A manifest blob whose bytes match its digest but are not JSON."""
    layout, top = sample
    bad = b'{"schemaVersion": 2, "layers": ['
    digest = "sha256:" + hashlib.sha256(bad).hexdigest()
    blob_path(layout, digest).write_bytes(bad)
    index = json.loads((layout / "index.json").read_bytes())
    for entry in index["manifests"]:
        if entry["annotations"][REF_NAME] == "v2":
            entry["digest"], entry["size"] = digest, len(bad)
    (layout / "index.json").write_text(json.dumps(index))
    before = dir_bytes(layout)

    err = validate_failed(cli("validate", layout), str(blob_path(layout, digest)),
                          "invalid JSON")
    assert str(blob_path(layout, top.digest)) not in err  # the good tag is not blamed
    one_error(cli("inspect", f"{layout}:v2"), INPUT, str(blob_path(layout, digest)),
              "invalid JSON")
    assert cli("validate", f"{layout}:v1").code == 0
    assert dir_bytes(layout) == before


def test_manifest_blob_overwritten_with_invalid_json(cli, sample):
    layout, top = sample
    path = blob_path(layout, top.digest)
    path.write_bytes(b"this is not JSON")
    before = dir_bytes(layout)
    validate_failed(cli("validate", layout), str(path))
    assert dir_bytes(layout) == before


BAD_MANIFEST = {
    "schemaVersion": 3,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": "sha256:" + "A" * 64, "size": 2},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": "sha256:" + "0" * 64}],
}


def test_validate_file_schema_violation(cli, tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(BAD_MANIFEST))
    err = validate_failed(cli("validate", "--kind", "manifest", path), str(path))
    assert "at schemaVersion" in err  # 3, not 2
    assert "'size' is a required property at layers[0]" in err
    assert "lowercase hex at config.digest" in err  # the config digest is upper-case hex
    problems = [ln for ln in err.splitlines() if not ln.startswith(PREFIX)]
    assert len(problems) >= 3
    assert all(ln.startswith(f"{path}: ") for ln in problems)


def test_validate_file_invalid_json(cli, tmp_path):
    path = tmp_path / "broken.json"
    path.write_bytes(b'{"schemaVersion": 2,')
    validate_failed(cli("validate", "--kind", "manifest", path), str(path), "invalid JSON")


def test_validate_stdin(cli, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(
        json.dumps(BAD_MANIFEST).encode())))
    err = validate_failed(cli("validate", "--kind", "manifest", "-"), "<stdin>")
    assert "size" in err and err.endswith(": error: <stdin>: 3 problem(s) found\n")


def test_validate_stdin_detects_kind(cli, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(
        json.dumps(BAD_MANIFEST).encode())))
    validate_failed(cli("validate", "-"), "<stdin>", "size")


def test_validate_stdin_valid_document(cli, monkeypatch, sample):
    layout, top = sample
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(
        blob_path(layout, top.digest).read_bytes())))
    res = cli("validate", "--kind", "manifest", "-")
    assert res.code == 0, res.err
    assert res.err == "" and res.out == "<stdin>: valid\n"


def test_validate_unreadable_file(cli, tmp_path):
    missing = tmp_path / "nope.json"
    res = cli("validate", "--kind", "manifest", missing)
    one_error(res, INPUT, str(missing))
    one_error(cli("validate", missing), INPUT, f"{missing}: no such file or layout directory")


# -- missing and corrupted blobs ----------------------------------------------------------


def test_missing_layer_blob(cli, sample, tmp_path):
    layout, top = sample
    layer = read_doc(layout, top.digest)["layers"][1]["digest"]
    blob_path(layout, layer).unlink()
    before = dir_bytes(layout)

    validate_failed(cli("validate", layout), layer)
    validate_failed(cli("validate", f"{layout}:v1"), layer)
    assert dir_bytes(layout) == before

    archive = tmp_path / "out.tar"
    res = cli("push", f"{layout}:v1", f"oci-archive:{archive}:x")
    assert res.code != 0
    assert "Traceback" not in res.err
    assert len(res.err.splitlines()) == 1 and res.err.startswith(PREFIX), res.err
    assert layer in res.err
    assert dir_bytes(layout) == before
    assert not archive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout"]


def add_unique_layer(layout: Path, tag: str) -> str:
    """Give `tag` an extra layer no registry has seen (skopeo cannot mount it); its digest."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        content = uuid.uuid4().hex.encode()
        info = tarfile.TarInfo("unique.txt")
        info.size, info.mtime = len(content), 0
        tar.addfile(info, io.BytesIO(content))
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    store = Layout.open(layout)
    with store.writing():
        top = store.resolve(tag)
        manifest = read_doc(layout, top.digest)
        config = read_doc(layout, manifest["config"]["digest"])
        config["rootfs"]["diff_ids"].append(diff_id)
        layer = store.put_bytes(gzip.compress(raw.getvalue(), mtime=0),
                                "application/vnd.oci.image.layer.v1.tar+gzip")
        manifest["config"] = store.put_bytes(json.dumps(config).encode(),
                                             manifest["config"]["mediaType"]).to_dict()
        manifest["layers"].append(layer.to_dict())
        desc = store.put_bytes(json.dumps(manifest).encode(), manifest["mediaType"])
        store.set_tag(tag, desc)
    return layer.digest


@pytest.mark.registry
def test_missing_layer_blob_push_to_registry(cli, registry, sample):
    layout, _ = sample
    layer = add_unique_layer(layout, "v1")
    assert cli("validate", f"{layout}:v1").code == 0
    blob_path(layout, layer).unlink()
    before = dir_bytes(layout)
    res = cli("push", "--no-tls-verify", f"{layout}:v1",
              f"docker://{registry.host}/{repo('missing-blob')}:1")
    assert res.code != 0
    assert "Traceback" not in res.err
    assert len(res.err.splitlines()) == 1 and res.err.startswith(PREFIX), res.err
    assert layer in res.err
    assert dir_bytes(layout) == before


@pytest.mark.registry
def test_push_with_missing_blob_fails_even_if_registry_has_it(cli, registry, sample):
    """skopeo mounts blobs the registry already has (blob-info cache) without reading them,
    so a push from a layout that lacks a blob must not report success on that account."""
    layout, top = sample
    assert cli("push", "--no-tls-verify", f"{layout}:v1",
               f"docker://{registry.host}/{repo('complete')}:1").code == 0
    layer = read_doc(layout, top.digest)["layers"][0]["digest"]
    blob_path(layout, layer).unlink()
    before = dir_bytes(layout)
    res = cli("push", "--no-tls-verify", f"{layout}:v1",
              f"docker://{registry.host}/{repo('incomplete')}:1")
    assert res.code != 0, f"push of a layout missing {layer} succeeded: {res.out}"
    assert len(res.err.splitlines()) == 1 and res.err.startswith(PREFIX), res.err
    assert dir_bytes(layout) == before


def flip_a_byte_of_the_first_layer(layout, top):
    """Corrupt the first layer blob in place, keeping its size; returns (descriptor, path)."""
    layer = read_doc(layout, top.digest)["layers"][0]
    path = blob_path(layout, layer["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return layer, path


def test_corrupted_layer_blob(cli, sample):
    layout, top = sample
    layer, path = flip_a_byte_of_the_first_layer(layout, top)
    assert path.stat().st_size == layer["size"]
    before = dir_bytes(layout)
    err = validate_failed(cli("validate", layout), str(path), "does not match digest")
    assert layer["digest"] in err
    assert dir_bytes(layout) == before


def test_unpack_of_corrupted_layer_writes_nothing(cli, sample, tmp_path):
    """A flipped byte inside incompressible content leaves a valid tar and deflate stream:
    only the digest (and the gzip CRC at the very end) can tell. Unpack must check the
    blob before writing a file: exit 5 and no target directory."""
    layout, _ = sample
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "random").write_bytes(os.urandom(2 << 20))
    assert cli("inject", f"{layout}:v1", tree).code == 0
    top = Layout.open(layout).resolve("v1")
    layer = read_doc(layout, top.digest)["layers"][-1]
    path = blob_path(layout, layer["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    target = tmp_path / "out"
    res = cli("unpack", f"{layout}:v1", target)
    one_error(res, INTEGRITY, layer["digest"][7:])
    assert not target.exists()


def test_push_of_corrupted_blob_is_an_integrity_error(cli, sample, tmp_path):
    """A layer whose bytes no longer match its digest: exit 5 (integrity), nothing written."""
    layout, top = sample
    layer, _ = flip_a_byte_of_the_first_layer(layout, top)
    before = dir_bytes(layout)
    archive = tmp_path / "out.tar"
    res = cli("push", f"{layout}:v1", f"oci-archive:{archive}:x")
    assert not archive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout"]
    assert dir_bytes(layout) == before
    one_error(res, INTEGRITY, layer["digest"])


def test_truncated_config_blob(cli, sample):
    layout, top = sample
    config = read_doc(layout, top.digest)["config"]
    path = blob_path(layout, config["digest"])
    path.write_bytes(path.read_bytes()[:-10])
    before = dir_bytes(layout)
    err = validate_failed(cli("validate", layout), str(path))
    assert f"its descriptor says {config['size']}" in err
    assert f"{config['size'] - 10} bytes" in err
    assert dir_bytes(layout) == before


def test_json_validate_on_broken_layout(cli, sample):
    layout, top = sample
    layer = read_doc(layout, top.digest)["layers"][0]["digest"]
    blob_path(layout, layer).unlink()
    res = cli("validate", "--json", layout)
    assert res.code == INVALID
    report = json.loads(res.out)
    assert report["valid"] is False
    assert report["problems"]
    assert any(layer in p for p in report["problems"])
    assert "Traceback" not in res.err


def test_json_validate_on_good_layout(cli, sample):
    layout, _ = sample
    res = cli("--json", "validate", layout)
    assert res.code == 0, res.err
    assert json.loads(res.out) == {"valid": True, "problems": []}


# -- not a layout, pull targets -----------------------------------------------------------


def test_not_a_layout_directory(cli, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file.txt").write_text("hello\n")
    before = dir_bytes(plain)
    for args in (("validate", plain), ("inspect", plain), ("gc", plain),
                 ("push", f"{plain}:v1", f"oci-archive:{tmp_path / 'out.tar'}")):
        one_error(cli(*args), INPUT, str(plain), "not an OCI layout")
        assert dir_bytes(plain) == before
    assert not (tmp_path / "out.tar").exists()


def test_missing_layout_directory(cli, tmp_path):
    missing = tmp_path / "missing"
    one_error(cli("inspect", missing), INPUT, str(missing))
    one_error(cli("gc", missing), INPUT, str(missing))
    assert not missing.exists()


def test_pull_into_a_regular_file(cli, sample, tmp_path):
    layout, _ = sample
    target = tmp_path / "a-file"
    target.write_bytes(b"do not touch\n")
    one_error(cli("pull", f"oci:{layout}:v1", target), INPUT, str(target))
    assert target.read_bytes() == b"do not touch\n"
    assert target.is_file()


def test_pull_into_non_layout_directory(cli, sample, tmp_path):
    layout, _ = sample
    target = tmp_path / "stuff"
    target.mkdir()
    (target / "keep.txt").write_text("mine\n")
    before = dir_bytes(target)
    one_error(cli("pull", f"oci:{layout}:v1", target), INPUT, str(target))
    assert dir_bytes(target) == before


def test_failed_pull_into_new_path_leaves_nothing(cli, sample, tmp_path):
    layout, _ = sample
    before = dir_bytes(layout)
    target = tmp_path / "new" / "deeper"
    res = cli("pull", f"oci:{layout}:nope", target)
    assert res.code != 0
    assert "Traceback" not in res.err
    assert len(res.err.splitlines()) == 1 and res.err.startswith(PREFIX), res.err
    assert "nope" in res.err
    assert not target.exists()
    assert dir_bytes(layout) == before


def test_failed_pull_into_new_nested_path_leaves_no_parent(cli, sample, tmp_path):
    """Parents created for a new layout go too when the pull fails."""
    layout, _ = sample
    res = cli("pull", f"oci:{layout}:nope", tmp_path / "new" / "deeper")
    assert res.code != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout"]


def test_failed_pull_into_existing_empty_directory_leaves_it_empty(cli, sample, tmp_path):
    layout, _ = sample
    target = tmp_path / "empty"
    target.mkdir()
    res = cli("pull", f"oci:{layout}:nope", target)
    assert res.code != 0
    assert len(res.err.splitlines()) == 1 and res.err.startswith(PREFIX), res.err
    assert target.is_dir()
    assert dir_bytes(target) == {}


def test_failed_pull_into_existing_layout_changes_nothing(cli, sample, tmp_path):
    layout, _ = sample
    other = tmp_path / "other"
    build_sample_image(other, "x", platforms=("arm64",))
    before = dir_bytes(other)
    res = cli("pull", f"oci:{layout}:nope", f"{other}:y")
    assert res.code != 0
    assert len(res.err.splitlines()) == 1 and res.err.startswith(PREFIX), res.err
    assert dir_bytes(other) == before


@pytest.mark.registry
def test_failed_registry_pull_into_new_path_leaves_nothing(cli, registry, tmp_path):
    target = tmp_path / "new"
    one_error(cli("pull", "--no-tls-verify", f"docker://{registry.host}/{repo('gone')}:1",
                  target), NOT_FOUND)
    assert not target.exists()


# -- missing skopeo, locked layout --------------------------------------------------------


def test_skopeo_missing(cli, sample, tmp_path, monkeypatch):
    layout, _ = sample
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    before = dir_bytes(layout)
    dest = tmp_path / "new"
    one_error(cli("pull", "--no-tls-verify", "docker://127.0.0.1:5000/x/y:1", dest), MISSING,
              "skopeo", "apt-get install skopeo")
    assert not dest.exists()
    one_error(cli("pull", f"oci:{layout}:v1", dest), MISSING, "apt-get install skopeo")
    assert not dest.exists()
    one_error(cli("push", f"{layout}:v1", f"oci-archive:{tmp_path / 'out.tar'}"), MISSING,
              "apt-get install skopeo")
    assert not (tmp_path / "out.tar").exists()
    assert dir_bytes(layout) == before


def test_locked_layout(cli, sample, tmp_path):
    layout, _ = sample
    before = dir_bytes(layout)
    with Layout.open(layout).lock(exclusive=True):
        one_error(cli("gc", "--lock-timeout", "0", layout), LOCKED, str(layout), "in use")
        one_error(cli("gc", "--lock-timeout", "0", "--dry-run", layout), LOCKED, str(layout))
        one_error(cli("pull", "--lock-timeout", "0", f"oci:{layout}:v1", f"{layout}:v3"),
                  LOCKED, str(layout))
    assert dir_bytes(layout) == before
    # the lock is gone with the holder
    assert cli("gc", layout).code == 0


def test_a_port_with_401_in_it_is_not_an_authentication_failure():
    from cvmfs_inject.skopeo.errors import classify

    error = classify('pinging container registry 127.0.0.1:40177: Get "https://127.0.0.1:'
                     '40177/v2/": x509: certificate signed by unknown authority', [], 1, "")
    assert "TLS verification failed" in str(error)
    assert "authentication failed" in str(classify("received unexpected HTTP status: 401 "
                                                   "Unauthorized", [], 1, ""))


def _module(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m cvmfs_inject ARGS`: the usage errors argparse itself writes and exits on."""
    return subprocess.run([sys.executable, "-m", "cvmfs_inject", *args], capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args", [("inject", "--max-layers", "101", "a:b", "t"),
                                  ("batch", "--jobs", "0", "plan.yaml"),
                                  ("frobnicate",), ("inject", "only-one-argument")])
def test_a_usage_error_is_one_line_pointing_at_help(args):
    done = _module(*args)
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("cvmfs-inject") and "--help'" in done.stderr


@pytest.mark.parametrize(("args", "unknown"), [(("inject", "--bogus", "a:b", "t"), "--bogus"),
                                               (("inspect", "a:b", "extra"), "extra")])
def test_an_argument_nothing_takes_points_at_the_commands_help(args, unknown):
    done = _module(*args)
    assert done.returncode == 2
    assert done.stderr == (f"cvmfs-inject {args[0]}: error: unrecognized arguments: {unknown} "
                           f"(see 'cvmfs-inject {args[0]} --help')\n")
