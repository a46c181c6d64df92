"""Registry-direct mode: edit images in a registry without downloading their base layers.

Every test pushes its own sample image to its own repository, runs the CLI in registry-direct
mode and then judges the result from the outside: the registry's access log (which requests
were made: no GET of a base-layer blob, only the new layer and configs uploaded, mounts for
another repository), `skopeo inspect --raw` (what the registry really holds) and a `pull`
back into a layout that must validate and unpack to the injected tree.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from helpers import assert_same_tree, make_nasty_tree, sha256, unique_repo
from registry import Registry, start_registry

from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.pack.options import PackOptions
from cvmfs_inject.pack.packer import pack

pytestmark = pytest.mark.registry

NO_TLS = "--no-tls-verify"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
KINDS = ("oci", "v2s2", "index", "v2s2-list")
PLATFORMS = {"oci": ("amd64",), "v2s2": ("amd64",), "index": ("amd64", "arm64"),
             "v2s2-list": ("amd64", "arm64")}
TOP_TYPE = {"oci": OCI_MANIFEST, "v2s2": DOCKER_MANIFEST, "index": OCI_INDEX,
            "v2s2-list": DOCKER_LIST}
CHILD_TYPE = {"index": OCI_MANIFEST, "v2s2-list": DOCKER_MANIFEST}
SUBPROCESS_TIMEOUT = 60.0


# -- helpers ---------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return unique_repo("direct", prefix)


def ok(result: Any) -> Any:
    assert result.code == 0, f"exit {result.code}\nstdout: {result.out}\nstderr: {result.err}"
    assert "Traceback" not in result.err
    return result


def one_line_error(result: Any, code: int, *secrets: str) -> str:
    """The documented failure shape: the exit code and exactly one `error:` line on stderr."""
    assert result.code == code, (
        f"expected exit {code}, got {result.code}\nstdout: {result.out}\nstderr: {result.err}")
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{result.err}"
    assert lines[0].startswith("cvmfs-inject: error:"), lines[0]
    assert "Traceback" not in result.err
    for secret in secrets:
        assert secret not in result.out and secret not in result.err, "a secret was printed"
    return lines[0]


def skopeo_raw(ref: str, flags: list[str]) -> bytes | None:
    """The registry's bytes for `ref` (`skopeo inspect --raw`), None when it does not exist."""
    proc = subprocess.run(["skopeo", "inspect", "--raw", *flags, ref], capture_output=True,
                          check=False, timeout=60)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        assert "manifest unknown" in err or "not found" in err.lower(), err
        return None
    return proc.stdout


def plain_flags(reg: Registry) -> list[str]:
    return reg.tls_flags("")


def top_digest(reg: Registry, repo_tag: str) -> str | None:
    raw = skopeo_raw(reg.url(repo_tag), plain_flags(reg))
    return None if raw is None else sha256(raw)


def manifests(reg: Registry, repo_tag: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(top document, {manifest digest: manifest document}) as the registry holds them."""
    raw = skopeo_raw(reg.url(repo_tag), plain_flags(reg))
    assert raw is not None, f"{repo_tag} does not exist"
    top = json.loads(raw)
    if "manifests" not in top:
        return top, {sha256(raw): top}
    repo = repo_tag.rsplit(":", 1)[0]
    docs = {}
    for entry in top["manifests"]:
        child = skopeo_raw(reg.url(f"{repo}@{entry['digest']}"), plain_flags(reg))
        assert child is not None and sha256(child) == entry["digest"]
        docs[entry["digest"]] = json.loads(child)
    return top, docs


def layer_digests(docs: dict[str, dict[str, Any]]) -> set[str]:
    return {layer["digest"] for doc in docs.values() for layer in doc["layers"]}


def config_digests(docs: dict[str, dict[str, Any]]) -> set[str]:
    return {doc["config"]["digest"] for doc in docs.values()}


def push_sample(cli, tmp_path: Path, reg: Registry, repo: str, kind: str = "oci",
                *flags: str) -> str:
    """Push the sample image of `kind` to repo:v1: oci, v2s2, a two-platform OCI index, or
    (v2s2-list) that index converted by skopeo into a Docker manifest list."""
    layout = tmp_path / f"sample-{kind}-{uuid.uuid4().hex[:6]}"
    build_sample_image(layout, "v1", platforms=PLATFORMS[kind])
    url = f"docker://{reg.host}/{repo}:v1"
    fmt = "v2s2" if kind.startswith("v2s2") else "keep"
    ok(cli("push", *(flags or (NO_TLS,)), "--format", fmt, f"{layout}:v1", url))
    return url


def requests_since(reg: Registry, start: int, last: tuple[str, str] | None = None, *,
                   query: bool = True) -> list[tuple[str, str]]:
    """The requests logged after index `start`, once the log has caught up.

    The registry writes an access line after its handler returns, so the client may already
    be done when the line is not yet there. With `last` (method, path without query) wait
    for that request; otherwise wait until the log stops growing.
    """
    deadline = time.monotonic() + 5.0
    previous = -1
    while True:
        log = reg.requests(query=query)[start:]
        if last is not None:
            if any((m, p.split("?", 1)[0]) == last for m, p in log):
                return log
        elif len(log) == previous:
            return log
        if time.monotonic() > deadline:
            return log  # let the assertions say what is missing
        previous = len(log)
        time.sleep(0.05)


def blob_requests(requests: list[tuple[str, str]], method: str, repo: str) -> list[str]:
    """Digests of `method /v2/<repo>/blobs/<digest>` requests (not uploads)."""
    prefix = f"/v2/{repo}/blobs/"
    return [path[len(prefix):].split("?", 1)[0] for m, path in requests
            if m == method and path.startswith(prefix)
            and not path.startswith(prefix + "uploads/")]


def uploads(requests: list[tuple[str, str]], repo: str | None = None
            ) -> list[tuple[str, str, dict[str, list[str]]]]:
    """(method, path, query) of every request under /blobs/uploads/ (optionally one repo's)."""
    out = []
    for method, uri in requests:
        parts = urlsplit(uri)
        if "/blobs/uploads/" not in parts.path:
            continue
        if repo is not None and not parts.path.startswith(f"/v2/{repo}/blobs/uploads/"):
            continue
        out.append((method, parts.path, parse_qs(parts.query)))
    return out


def uploaded_digests(requests: list[tuple[str, str]], repo: str | None = None) -> list[str]:
    """The `digest=` of every upload-completing PUT (parse_qs decodes `sha256%3A...`)."""
    return [query["digest"][0] for method, _, query in uploads(requests, repo)
            if method == "PUT" and "digest" in query]



def check_pulled(cli, url: str, tree: Path, tmp_path: Path, kind: str = "oci",
                 *flags: str) -> Path:
    """Pull `url` back (all platforms), validate, and unpack every platform against `tree`."""
    layout = tmp_path / f"back-{uuid.uuid4().hex[:6]}"
    ok(cli("pull", *(flags or (NO_TLS,)), "--all", url, f"{layout}:t"))
    ok(cli("validate", layout))
    for arch in PLATFORMS[kind]:
        out = tmp_path / f"unpacked-{uuid.uuid4().hex[:6]}"
        ok(cli("unpack", "--platform", f"linux/{arch}", f"{layout}:t", out))
        assert_same_tree(tree, out)
    return layout


def check_base_kept(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
                    ) -> None:
    """Each new manifest is its old one plus one appended layer: base layers untouched."""
    assert len(before) == len(after)
    old = list(before.values())
    for doc in after.values():
        matches = [o for o in old if doc["layers"][:-1] == o["layers"]]
        assert len(matches) == 1, f"base layers changed: {doc['layers']} vs {old}"
        assert len(doc["layers"]) == len(matches[0]["layers"]) + 1
        assert doc.get("mediaType") == matches[0].get("mediaType")
        assert doc["config"]["mediaType"] == matches[0]["config"]["mediaType"]
        assert doc["config"]["digest"] != matches[0]["config"]["digest"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_nasty_tree(tmp_path / "tree")


@pytest.fixture
def no_default_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No auth file anywhere skopeo or the registry client would look; a fresh --creds-stdin."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("DOCKER_CONFIG", str(home / ".docker"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    return home


# -- inject: formats kept, tree round-trips, base layers untouched ---------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_inject_direct_round_trip(cli, registry, tmp_path, tree, kind):
    repo = unique(f"rt-{kind}")
    url = push_sample(cli, tmp_path, registry, repo, kind)
    top_before, before = manifests(registry, f"{repo}:v1")

    res = ok(cli("inject", "--json", NO_TLS, url, tree))
    report = json.loads(res.out)
    assert report["status"] == "injected"

    top_after, after = manifests(registry, f"{repo}:v1")
    assert report["digest"] == top_digest(registry, f"{repo}:v1")
    check_base_kept(before, after)
    new_layers = {doc["layers"][-1]["digest"] for doc in after.values()}
    assert new_layers == {report["layer"]["digest"]}
    assert top_before.get("mediaType") == TOP_TYPE[kind]
    assert top_after.get("mediaType") == TOP_TYPE[kind]
    if kind in CHILD_TYPE:
        assert [m["platform"] for m in top_after["manifests"]] == \
            [m["platform"] for m in top_before["manifests"]]
        assert [m["mediaType"] for m in top_after["manifests"]] == [CHILD_TYPE[kind]] * 2
        assert all(doc["mediaType"] == CHILD_TYPE[kind] for doc in after.values())
    check_pulled(cli, url, tree, tmp_path, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_inject_direct_downloads_no_base_layer(cli, registry, tmp_path, tree, kind):
    repo = unique(f"nodl-{kind}")
    url = push_sample(cli, tmp_path, registry, repo, kind)
    _, before = manifests(registry, f"{repo}:v1")
    base = layer_digests(before)

    start = len(registry.requests())
    ok(cli("inject", NO_TLS, url, tree))
    log = requests_since(registry, start, ("PUT", f"/v2/{repo}/manifests/v1"))
    _, after = manifests(registry, f"{repo}:v1")

    gets = blob_requests(log, "GET", repo)
    assert not set(gets) & base, f"base layers downloaded: {set(gets) & base}"
    assert set(gets) <= config_digests(before), f"unexpected blob GETs {gets}"
    new_blobs = (layer_digests(after) - base) | config_digests(after)
    assert len(new_blobs) == 1 + len(after)  # one shared layer, one config per platform
    pushed = uploaded_digests(log)
    assert sorted(pushed) == sorted(new_blobs), f"uploaded {pushed}, new {new_blobs}"
    ups = uploads(log)
    assert all(path.startswith(f"/v2/{repo}/") for _, path, _ in ups)
    posts = [q for m, _, q in ups if m == "POST"]
    assert len(posts) == len(new_blobs) and not any("mount" in q for q in posts)
    assert not [m for m, _, _ in ups if m == "PATCH"]  # small blobs: one PUT each
    assert not [m for m, _ in log if m == "DELETE"]
    # manifests last: nothing touches blobs after the first manifest PUT, the tag is last
    first_manifest = next(i for i, (m, p) in enumerate(log)
                          if m == "PUT" and "/manifests/" in p)
    assert all("/manifests/" in p for _, p in log[first_manifest:])
    assert log[-1] == ("PUT", f"/v2/{repo}/manifests/v1")
    assert len([1 for m, p in log if m == "PUT" and "/manifests/" in p]) == \
        (len(after) + 1 if kind in CHILD_TYPE else 1)


def test_dest_same_registry_mounts_base_blobs(cli, registry, tmp_path, tree):
    src_repo, dest_repo = unique("mount-src"), unique("mount-dest")
    url = push_sample(cli, tmp_path, registry, src_repo)
    src_digest = top_digest(registry, f"{src_repo}:v1")
    _, before = manifests(registry, f"{src_repo}:v1")
    base = layer_digests(before)
    dest = f"docker://{registry.host}/{dest_repo}:injected"

    start = len(registry.requests())
    ok(cli("inject", NO_TLS, url, tree, "--dest", dest))
    log = requests_since(registry, start, ("PUT", f"/v2/{dest_repo}/manifests/injected"))

    assert top_digest(registry, f"{src_repo}:v1") == src_digest  # source tag unchanged
    _, after = manifests(registry, f"{dest_repo}:injected")
    check_base_kept(before, after)
    mounts = {q["mount"][0]: q["from"][0] for m, _, q in uploads(log, dest_repo)
              if m == "POST" and "mount" in q}
    assert mounts == dict.fromkeys(base, src_repo), mounts
    assert not set(blob_requests(log, "GET", src_repo)) & base
    pushed = uploaded_digests(log)
    assert not set(pushed) & base, "base blobs were uploaded instead of mounted"
    assert sorted(pushed) == sorted((layer_digests(after) - base) | config_digests(after))
    assert not uploads(log, src_repo), "the source repository was written to"
    check_pulled(cli, dest, tree, tmp_path)


def test_dest_other_registry_streams_base_blobs(cli, registry, tmp_path, tree):
    src_repo, dest_repo = unique("xreg-src"), unique("xreg-dest")
    url = push_sample(cli, tmp_path, registry, src_repo)
    src_digest = top_digest(registry, f"{src_repo}:v1")
    _, before = manifests(registry, f"{src_repo}:v1")
    base = layer_digests(before)

    other = start_registry(tmp_path / "other-registry")
    try:
        dest = f"docker://{other.host}/{dest_repo}:copied"
        start = len(registry.requests())
        ok(cli("inject", NO_TLS, url, tree, "--dest", dest))
        src_log = requests_since(registry, start)
        dest_log = requests_since(other, 0, ("PUT", f"/v2/{dest_repo}/manifests/copied"))

        assert top_digest(registry, f"{src_repo}:v1") == src_digest
        assert not uploads(src_log), "the source registry was written to"
        # streaming needs the bytes: base blobs are read from the source this time
        assert base <= set(blob_requests(src_log, "GET", src_repo))
        for digest in base:
            status, _, body = other.get(f"/v2/{dest_repo}/blobs/{digest}")
            assert status == 200 and sha256(body) == digest
        _, after = manifests(other, f"{dest_repo}:copied")
        check_base_kept(before, after)
        assert sorted(uploaded_digests(dest_log)) == sorted(
            layer_digests(after) | config_digests(after))
        assert dest_log[-1] == ("PUT", f"/v2/{dest_repo}/manifests/copied")
        check_pulled(cli, dest, tree, tmp_path)
    finally:
        other.stop()


def test_direct_and_layout_paths_give_the_same_digest(cli, registry, tmp_path, tree, epoch):
    repo = unique("repro")
    url = push_sample(cli, tmp_path, registry, repo)
    layout = tmp_path / "local"
    ok(cli("pull", NO_TLS, url, f"{layout}:t"))

    local = json.loads(ok(cli("inject", "--json", f"{layout}:t", tree)).out)
    direct = json.loads(ok(cli("inject", "--json", NO_TLS, url, tree)).out)

    local_digest = json.loads(ok(cli("inspect", "--json", f"{layout}:t")).out)["digest"]
    entries = json.loads((layout / "index.json").read_bytes())["manifests"]
    assert local_digest in [e["digest"] for e in entries]
    remote_digest = json.loads(ok(cli("inspect", "--json", NO_TLS, url)).out)["digest"]
    assert remote_digest == top_digest(registry, f"{repo}:v1")
    assert local["layer"] == direct["layer"]
    assert local_digest == local["digest"]
    assert remote_digest == direct["digest"]
    assert remote_digest == local_digest


# -- unpack, init, inspect -------------------------------------------------------------------


def test_unpack_direct_downloads_only_the_injected_layer(cli, registry, tmp_path, tree):
    repo = unique("unpack")
    url = push_sample(cli, tmp_path, registry, repo)
    report = json.loads(ok(cli("inject", "--json", NO_TLS, url, tree)).out)
    _, docs = manifests(registry, f"{repo}:v1")
    layer = report["layer"]["digest"]

    start = len(registry.requests())
    out = tmp_path / "out"
    ok(cli("unpack", NO_TLS, url, out))
    log = requests_since(registry, start, ("GET", f"/v2/{repo}/blobs/{layer}"), query=False)

    gets = blob_requests(log, "GET", repo)
    layer_gets = [d for d in gets if d not in config_digests(docs)]
    assert layer_gets == [layer], f"blob GETs {gets}"
    assert [m for m, _ in log if m not in ("GET", "HEAD")] == []
    assert_same_tree(tree, out)


def test_init_direct_appends_an_empty_layer_once(cli, registry, tmp_path):
    repo = unique("init")
    url = push_sample(cli, tmp_path, registry, repo)
    _, before = manifests(registry, f"{repo}:v1")

    res = ok(cli("init", NO_TLS, url))
    assert "prepared with an empty /cvmfs layer" in res.out
    digest = top_digest(registry, f"{repo}:v1")
    _, after = manifests(registry, f"{repo}:v1")
    check_base_kept(before, after)
    info = json.loads(ok(cli("inspect", "--json", NO_TLS, url)).out)
    (image,) = info["images"]
    assert image["injected"]["position"] == len(image["layers"]) - 1
    assert image["injected"]["diff_id"] == image["layers"][-1]["diff_id"]
    out = tmp_path / "empty"
    ok(cli("unpack", NO_TLS, url, out))
    assert list(out.iterdir()) == []

    start = len(registry.requests())
    res = ok(cli("init", NO_TLS, url))
    assert "already prepared" in res.out
    assert top_digest(registry, f"{repo}:v1") == digest
    assert not [r for r in requests_since(registry, start) if r[0] in ("PUT", "POST", "PATCH")]


def test_inspect_direct_shows_the_injected_layer(cli, registry, tmp_path, tree):
    repo = unique("inspect")
    url = push_sample(cli, tmp_path, registry, repo)
    before = json.loads(ok(cli("inspect", "--json", NO_TLS, url)).out)
    assert before["images"][0]["injected"] is None
    report = json.loads(ok(cli("inject", "--json", NO_TLS, url, tree)).out)

    info = json.loads(ok(cli("inspect", "--json", NO_TLS, url)).out)
    image = info["images"][0]
    position = len(before["images"][0]["layers"])
    assert image["injected"] == {"position": position,
                                 "diff_id": report["layer"]["diff_id"]}
    assert image["layers"][position]["digest"] == report["layer"]["digest"]
    assert image["layers"][position]["diff_id"] == report["layer"]["diff_id"]
    assert info["digest"] == report["digest"] == top_digest(registry, f"{repo}:v1")


# -- run -------------------------------------------------------------------------------------


def test_run_registry_to_registry_is_direct(cli, registry, tmp_path, tree):
    src_repo, dest_repo = unique("run-src"), unique("run-dest")
    url = push_sample(cli, tmp_path, registry, src_repo)
    _, before = manifests(registry, f"{src_repo}:v1")
    base = layer_digests(before)
    dest = f"docker://{registry.host}/{dest_repo}:out"

    start = len(registry.requests())
    ok(cli("run", NO_TLS, url, tree, dest))
    log = requests_since(registry, start, ("PUT", f"/v2/{dest_repo}/manifests/out"))
    assert not set(blob_requests(log, "GET", src_repo)) & base, "run pulled base layers"
    assert not set(uploaded_digests(log)) & base
    check_pulled(cli, dest, tree, tmp_path)


def test_run_via_layout_downloads_and_works(cli, registry, tmp_path, tree):
    src_repo, dest_repo = unique("runvl-src"), unique("runvl-dest")
    url = push_sample(cli, tmp_path, registry, src_repo)
    _, before = manifests(registry, f"{src_repo}:v1")
    base = layer_digests(before)
    dest = f"docker://{registry.host}/{dest_repo}:out"

    start = len(registry.requests())
    ok(cli("run", NO_TLS, "--via-layout", url, tree, dest))
    log = requests_since(registry, start, ("PUT", f"/v2/{dest_repo}/manifests/out"), query=False)
    assert base <= set(blob_requests(log, "GET", src_repo)), "--via-layout pulled nothing"
    _, after = manifests(registry, f"{dest_repo}:out")
    check_base_kept(before, after)
    check_pulled(cli, dest, tree, tmp_path)


# -- TLS and credentials ---------------------------------------------------------------------


def secure_flags(reg: Registry) -> list[str]:
    return ["--cert-dir", str(reg.cert_dir), "--authfile", str(reg.authfile)]


def test_secure_registry_cert_dir_and_authfile(cli, secure_registry, tmp_path, tree,
                                               no_default_auth):
    reg = secure_registry
    repo = unique("secure")
    url = push_sample(cli, tmp_path, reg, repo, "oci", *secure_flags(reg))
    before = top_digest(reg, f"{repo}:v1")
    report = json.loads(ok(cli("inject", "--json", *secure_flags(reg), url, tree)).out)
    assert report["digest"] == top_digest(reg, f"{repo}:v1") != before
    check_pulled(cli, url, tree, tmp_path, "oci", *secure_flags(reg))


def test_secure_registry_creds_stdin(cli, secure_registry, tmp_path, tree, no_default_auth,
                                     monkeypatch):
    reg = secure_registry
    assert reg.auth is not None
    user, password = reg.auth
    repo = unique("stdin")
    url = push_sample(cli, tmp_path, reg, repo, "oci", *secure_flags(reg))
    before = top_digest(reg, f"{repo}:v1")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{user}:{password}\n"))
    res = ok(cli("inject", "--json", "--cert-dir", reg.cert_dir, "--creds-stdin", url, tree))
    assert password not in res.out + res.err
    assert json.loads(res.out)["digest"] == top_digest(reg, f"{repo}:v1") != before


def test_a_tree_holding_the_scratch_store_is_refused(cli, registry, tmp_path, monkeypatch):
    """Registry-direct writes new blobs into a scratch store in $TMPDIR: a tree that holds
    it would be packed with the blobs being written."""
    repo = unique("overlap")
    url = push_sample(cli, tmp_path, registry, repo)
    tree = tmp_path / "tree"
    (tree / "tmp").mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(tree / "tmp"))
    before = top_digest(registry, f"{repo}:v1")
    result = cli("inject", NO_TLS, url, tree)
    assert result.code == 3 and "overlap" in result.err, result.err
    assert top_digest(registry, f"{repo}:v1") == before


def test_creds_stdin_reach_skopeo_without_a_file(cli, secure_registry, tmp_path,
                                                  no_default_auth, monkeypatch):
    """skopeo (pull) gets stdin credentials from an in-memory file: nothing holding the
    password is ever created in the temp directory, so a killed command leaves none behind."""
    reg = secure_registry
    assert reg.auth is not None
    user, password = reg.auth
    repo = unique("stdinpull")
    push_sample(cli, tmp_path, reg, repo, "oci", *secure_flags(reg))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{user}:{password}\n"))
    res = ok(cli("--creds-stdin", "pull", "--cert-dir", reg.cert_dir,
                 f"docker://{reg.host}/{repo}:v1", f"{tmp_path}/pulled:v1"))
    assert password not in res.out + res.err
    assert list(scratch.iterdir()) == []
    assert Layout(tmp_path / "pulled").resolve("v1")


def test_secure_registry_auth_file_from_env(cli, secure_registry, tmp_path, tree,
                                            no_default_auth, monkeypatch):
    reg = secure_registry
    repo = unique("envauth")
    url = push_sample(cli, tmp_path, reg, repo, "oci", *secure_flags(reg))
    before = top_digest(reg, f"{repo}:v1")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(reg.authfile))
    report = json.loads(ok(cli("inject", "--json", "--cert-dir", reg.cert_dir, url, tree)).out)
    assert report["digest"] == top_digest(reg, f"{repo}:v1") != before


# -- errors ----------------------------------------------------------------------------------


def test_wrong_password_is_a_registry_error(cli, secure_registry, tmp_path, tree,
                                            no_default_auth):
    reg = secure_registry
    assert reg.auth is not None
    user, password = reg.auth
    repo = unique("wrongpw")
    url = push_sample(cli, tmp_path, reg, repo, "oci", *secure_flags(reg))
    before = top_digest(reg, f"{repo}:v1")
    wrong = "not-the-" + uuid.uuid4().hex
    token = base64.b64encode(f"{user}:{wrong}".encode()).decode()
    authfile = tmp_path / "wrong-auth.json"
    authfile.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))

    res = cli("inject", "--cert-dir", reg.cert_dir, "--authfile", authfile, url, tree)
    line = one_line_error(res, 6, wrong, password, token)
    assert "authentication" in line.lower()
    assert top_digest(reg, f"{repo}:v1") == before


def test_missing_credentials_is_a_registry_error(cli, secure_registry, tmp_path, tree,
                                                 no_default_auth):
    reg = secure_registry
    assert reg.auth is not None
    repo = unique("nocreds")
    url = push_sample(cli, tmp_path, reg, repo, "oci", *secure_flags(reg))
    before = top_digest(reg, f"{repo}:v1")

    res = cli("inject", "--cert-dir", reg.cert_dir, url, tree)
    line = one_line_error(res, 6, reg.auth[1])
    assert "authentication" in line.lower()
    assert top_digest(reg, f"{repo}:v1") == before


def test_unknown_tag_is_not_found(cli, registry, tmp_path, tree):
    repo = unique("notag")
    dest = push_sample(cli, tmp_path, registry, repo)
    before = top_digest(registry, f"{repo}:v1")

    start = len(registry.requests())
    res = cli("inject", NO_TLS, f"docker://{registry.host}/{repo}:no-such-tag", tree,
              "--dest", dest)
    one_line_error(res, 4)
    assert top_digest(registry, f"{repo}:v1") == before
    assert not [r for r in requests_since(registry, start) if r[0] in ("PUT", "POST", "PATCH")]


def test_tls_without_cert_dir_is_a_registry_error(cli, secure_registry, tmp_path, tree,
                                                  no_default_auth):
    reg = secure_registry
    repo = unique("tls")
    url = push_sample(cli, tmp_path, reg, repo, "oci", *secure_flags(reg))
    before = top_digest(reg, f"{repo}:v1")

    res = cli("inject", "--authfile", reg.authfile, url, tree)
    line = one_line_error(res, 6, reg.auth[1] if reg.auth else "")
    assert "tls" in line.lower() or "certificate" in line.lower()
    assert top_digest(reg, f"{repo}:v1") == before


def _layer_digest(tree: Path, epoch: int) -> str:
    """What `inject` will upload for `tree` with default options (the packer is deterministic)."""
    with Layout.create(tree.parent / "probe").writer() as writer:
        pack(tree, writer, PackOptions(source_date_epoch=epoch))
        return writer.peek_digest()


def test_registry_down_mid_upload(cli, registry, tmp_path, epoch):
    src_repo, dest_repo = unique("down-src"), unique("down-dest")
    url = push_sample(cli, tmp_path, registry, src_repo)
    src_digest = top_digest(registry, f"{src_repo}:v1")
    tree = tmp_path / "big"
    for i in range(10):  # 40 MiB that gzip cannot shrink: above the single-PUT limit
        path = tree / f"d{i}" / f"random-{i}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(os.urandom(4 << 20))
    layer = _layer_digest(tree, epoch)

    other = start_registry(tmp_path / "flaky-registry")
    try:
        url2 = f"docker://{other.host}/{dest_repo}:v1"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        proc = subprocess.Popen(
            [sys.executable, "-m", "cvmfs_inject", "inject", NO_TLS, url, str(tree),
             "--dest", url2], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            deadline = time.monotonic() + SUBPROCESS_TIMEOUT
            seen = False
            while not seen and proc.poll() is None and time.monotonic() < deadline:
                log = other.requests(query=True)
                heads = [i for i, (m, p) in enumerate(log) if m == "HEAD" and p.endswith(layer)]
                seen = any(m == "PATCH" for m, _ in log) or bool(heads and any(
                    m == "POST" and "/blobs/uploads/" in p for m, p in log[heads[0]:]))
                if not seen:
                    time.sleep(0.01)
            assert seen, f"the layer upload never started (exit {proc.poll()}):\n" \
                         f"{other.log_tail()}"
            stopped_at = time.monotonic()
            other.stop()
            out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
            elapsed = time.monotonic() - stopped_at
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode != 0, f"inject succeeded although the registry went down: {out}"
        assert proc.returncode == 6, err
        assert elapsed < SUBPROCESS_TIMEOUT
        lines = err.decode(errors="replace").strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cvmfs-inject: error:"), lines
        assert other.host in lines[0] and layer in lines[0], lines[0]

        other.restart()
        assert other.get(f"/v2/{dest_repo}/manifests/v1")[0] == 404
        assert top_digest(other, f"{dest_repo}:v1") is None
        assert top_digest(registry, f"{src_repo}:v1") == src_digest
    finally:
        other.stop()
