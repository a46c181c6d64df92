"""`batch PLAN.yaml`: one tree into many images against real registries and archives.

The registry's access log is the witness for "packed once, uploaded once per registry":
the new layer's digest is PUT once; the other repositories get it by a mount.
"""

from __future__ import annotations

import errno
import json
import uuid
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from helpers import assert_same_tree, dir_bytes, make_nasty_tree

from cvmfs_inject.batch.packs import pack_once
from cvmfs_inject.batch.plan import Job, load_plan, shard
from cvmfs_inject.commands import batch as batch_command
from cvmfs_inject.demo.sample import build_sample_image


def _push(cli, tmp_path: Path, registry, repo: str, *, docker: bool = False,
          platforms: tuple[str, ...] = ("amd64",), flags: tuple[str, ...] = ()) -> str:
    layout = tmp_path / f"sample-{uuid.uuid4().hex[:6]}"
    build_sample_image(layout, "v1", docker=docker, platforms=platforms)
    url = f"docker://{registry.host}/{repo}:v1"
    result = cli("push", *(flags or ("--no-tls-verify",)), "--format",
                 "v2s2" if docker else "keep", f"{layout}:v1", url)
    assert result.code == 0, result.err
    return url


def _uploads_and_mounts(registry, start: int) -> tuple[list[str], list[str]]:
    """Digests whose upload completed (PUT ...?digest=) and that were mounted (POST
    ...?mount=), since request `start`."""
    uploaded, mounted = [], []
    for method, uri in registry.requests(query=True)[start:]:
        path, _, query = uri.partition("?")
        args = parse_qs(query)
        if method == "PUT" and "/blobs/uploads/" in path and "digest" in args:
            uploaded.append(args["digest"][0])
        elif method == "POST" and "mount" in args:
            mounted.append(args["mount"][0])
    return uploaded, mounted


@pytest.fixture
def plan_setup(cli, registry, tmp_path):
    """Three registry images (OCI, Docker v2s2, a two-platform index) and a plan writing
    each to a new repository by `output`, plus one into a docker-archive."""
    area = f"batch-{uuid.uuid4().hex[:8]}"
    sources = {
        "oci": _push(cli, tmp_path, registry, f"{area}/oci"),
        "docker": _push(cli, tmp_path, registry, f"{area}/docker", docker=True),
        "index": _push(cli, tmp_path, registry, f"{area}/multi",
                       platforms=("amd64", "arm64")),
    }
    tree = make_nasty_tree(tmp_path / "tree")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
tree: tree
path: /cvmfs
compress: gzip
output: docker://{registry.host}/{area}-out/{{repository}}:{{tag}}-cvmfs
images:
  - from: {sources['oci']}
  - from: {sources['docker']}
  - from: {sources['index']}
    platforms: [linux/amd64, linux/arm64]
  - from: {sources['oci']}
    to: docker-archive:out/oci-cvmfs.tar:hep/oci:cvmfs
""")
    (tmp_path / "out").mkdir()
    return plan, tree, area


def test_a_plan_packs_once_and_uploads_each_blob_once_per_registry(cli, registry, tmp_path,
                                                                   plan_setup):
    plan, tree, area = plan_setup
    start = len(registry.requests())
    result = cli("--json", "--no-tls-verify", "batch", plan, "--jobs", "4")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [image["status"] for image in report["images"]] == ["updated"] * 4
    assert len(report["packed"]) == 1
    uploaded, mounted = _uploads_and_mounts(registry, start)
    layer = json.loads(cli("--json", "--no-tls-verify", "inspect",
                           f"docker://{registry.host}/{area}-out/{area}/oci:v1-cvmfs").out)
    layer_digest = layer["images"][0]["layers"][-1]["digest"]
    assert uploaded.count(layer_digest) == 1, uploaded
    sent = [image["uploaded"] for image in report["images"][:3]]  # registry-direct ones
    assert sum(sent) > layer["images"][0]["layers"][-1]["size"] > max(sorted(sent)[:2])
    assert mounted.count(layer_digest) == 2  # the Docker image and the index
    for repo, count in (("oci", 1), ("docker", 1), ("multi", 2)):
        out = tmp_path / f"back-{repo}"
        pulled = cli("--no-tls-verify", "pull", "--all",
                     f"docker://{registry.host}/{area}-out/{area}/{repo}:v1-cvmfs",
                     f"{out}:t")
        assert pulled.code == 0, pulled.err
        assert cli("validate", out).code == 0
        for arch in ("amd64", "arm64")[:count]:
            unpacked = tmp_path / f"unpacked-{repo}-{arch}"
            done = cli("unpack", "--platform", f"linux/{arch}", f"{out}:t", unpacked)
            assert done.code == 0, done.err
            assert_same_tree(tree, unpacked)
    archive = tmp_path / "out/oci-cvmfs.tar"
    done = cli("unpack", f"docker-archive:{archive}", tmp_path / "from-archive")
    assert done.code == 0, done.err
    assert_same_tree(tree, tmp_path / "from-archive")

    # the same plan again: nothing to do, nothing uploaded, the archive left as it was
    before = archive.stat().st_mtime_ns
    start = len(registry.requests())
    result = cli("--json", "--no-tls-verify", "batch", plan)
    assert result.code == 0, result.err
    assert [image["status"] for image in json.loads(result.out)["images"]] == \
        ["unchanged"] * 4
    assert _uploads_and_mounts(registry, start) == ([], [])
    assert not [m for m, _ in registry.requests()[start:] if m in ("PUT", "PATCH", "POST")]
    assert archive.stat().st_mtime_ns == before


def test_one_failing_image_does_not_stop_the_others(cli, registry, tmp_path):
    area = f"batch-{uuid.uuid4().hex[:8]}"
    good = _push(cli, tmp_path, registry, f"{area}/good")
    make_nasty_tree(tmp_path / "tree")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
tree: tree
images:
  - from: docker://{registry.host}/{area}/missing:v1
    to: docker://{registry.host}/{area}/missing:out
  - from: {good}
    to: docker://{registry.host}/{area}/good:out
""")
    result = cli("--json", "--no-tls-verify", "batch", plan)
    assert result.code == 9, result.err
    report = json.loads(result.out)
    first, second = report["images"]
    assert first["status"] == "failed" and "missing" in first["error"]
    assert first["exit_code"] == 4
    assert second["status"] == "updated"
    assert result.err.strip().splitlines()[-1].endswith(
        "1 of 2 images failed (the others are done)")


BAD_PLANS = {
    "yaml": ("tree: t\nimages:\n\t- from: docker://r.example/a:1\n", 3, "not valid YAML"),
    "unknown key": ("tree: t\nimages:\n  - from: docker://r.example/a:1\n    too: "
                    "docker://r.example/b:1\n", 4, "images[0].too: unknown key 'too'; did "
                    "you mean 'to'?"),
    "platform": ("tree: t\nimages:\n  - from: docker://r.example/a:1\n    to: "
                 "docker://r.example/b:1\n    platforms: [linux]\n", 5,
                 "images[0].platforms[0]"),
    "compress": ("tree: t\ncompress: lz4\nimages:\n  - from: docker://r.example/a:1\n"
                 "    to: docker://r.example/b:1\n", 2, "compress"),
    "no destination": ("tree: t\nimages:\n  - from: docker://r.example/a:1\n", 3,
                       "no destination"),
    "no tree": ("images:\n  - from: docker://r.example/a:1\n    to: docker://r.example/b:1\n",
                2, "no tree"),
    "bad reference": ("tree: t\nimages:\n  - from: docker://r.example/A:1\n"
                      "    to: docker://r.example/b:1\n", 3, "images[0].from"),
    "no images": ("tree: t\nimages: []\n", 2, "images"),
    "level": ("tree: t\nlevel: 9\nimages:\n  - from: docker://r.example/a:1\n"
              "    to: docker://r.example/b:1\n", 2, "level: --level 9 is out of range"),
    "not a mapping": ("- just a list\n", 1, "(the plan)"),
    "aliases": ("a: &a [x, x, x]\nb: [*a, *a, *a]\nimages: []\n", 2, "aliases"),
    "output format spec": ("tree: t\noutput: docker://r.example/{repository:>999999999}:x\n"
                           "images:\n  - from: docker://r.example/a:1\n", 4,
                           "only {repository} and {tag}"),
    "output attribute": ("tree: t\noutput: docker://r.example/{repository.upper}:x\n"
                         "images:\n  - from: docker://r.example/a:1\n", 4,
                         "only {repository} and {tag}"),
    "output stray brace": ("tree: t\noutput: docker://r.example/{repository}}:x\n"
                           "images:\n  - from: docker://r.example/a:1\n", 4,
                           "only {repository} and {tag}"),
    "a key twice": ("tree: t\nimages:\n  - from: docker://r.example/a:1\n"
                    "    to: docker://r.example/b:1\n    to: docker://r.example/c:1\n", 5,
                    "images[0].to: given twice"),
    "one destination twice": ("tree: t\nimages:\n  - from: docker://r.example/a:1\n"
                              "    to: docker://r.example/b\n  - from: docker://r.example/c:1\n"
                              "    to: docker://r.example/b:latest\n", 5,
                              "images[1].to: docker://r.example/b:latest is also the "
                              "destination of images[0] (line 3)"),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
def test_a_malformed_plan_is_one_line_naming_line_and_key(cli, tmp_path, name):
    text, line, key = BAD_PLANS[name]
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    before = dir_bytes(tmp_path)
    result = cli("batch", plan)
    assert result.code == 3, result.err
    assert result.err.count("\n") == 1, result.err
    assert f"{plan}:{line}:" in result.err and key in result.err, result.err
    assert dir_bytes(tmp_path) == before


def test_a_whole_number_written_as_a_float_is_that_number(tmp_path):
    """JSON Schema counts 1.0 as an integer; the packer then gets the integer."""
    plan = tmp_path / "plan.yaml"
    plan.write_text("tree: t\nlevel: 1.0\nmax_layers: 2.0\nimages:\n"
                    "  - from: docker://r.example/a:1\n    to: docker://r.example/b:1\n")
    (job,) = load_plan(plan).jobs
    assert (job.options.level, job.stack.max_layers) == (1, 2)
    assert type(job.options.level) is int and type(job.stack.max_layers) is int


def test_an_archive_destination_that_is_no_archive_file_fails_that_image(cli, tmp_path):
    """A directory, or a file of the working layout, is refused before anything is written;
    the other images go on."""
    layout = tmp_path / "sample"
    build_sample_image(layout, "v1")
    assert cli("push", f"{layout}:v1", f"docker-archive:{tmp_path}/in.tar:hep/el8:v1").code == 0
    make_nasty_tree(tmp_path / "tree")
    (tmp_path / "outdir").mkdir()
    plan = tmp_path / "plan.yaml"
    plan.write_text("tree: tree\nimages:\n"
                    "  - from: docker-archive:in.tar\n    to: docker-archive:outdir\n"
                    "  - from: docker-archive:in.tar\n    to: docker-archive:cache/index.json\n"
                    "  - from: docker-archive:in.tar\n    to: docker-archive:good.tar:a/b:c\n")
    assert cli("batch", plan, "--layout", tmp_path / "cache").code == 9  # makes the cache
    index = (tmp_path / "cache" / "index.json").read_bytes()
    result = cli("--json", "batch", plan, "--layout", tmp_path / "cache")
    assert result.code == 9, result.err
    first, second, third = json.loads(result.out)["images"]
    assert "is a directory" in first["error"] and first["exit_code"] == 2
    assert "inside the OCI layout" in second["error"] and second["exit_code"] == 2
    assert third["status"] == "unchanged"
    assert list((tmp_path / "outdir").iterdir()) == []
    assert json.loads((tmp_path / "cache" / "index.json").read_bytes()) == json.loads(index)


def test_a_tree_the_file_system_refuses_fails_its_images_naming_the_file(cli, tmp_path,
                                                                        monkeypatch):
    """An OSError while packing (EIO, a vanished file) is that tree's images' failure,
    with the path; the batch goes on and the layout cache holds the packing scratch."""
    layout = tmp_path / "sample"
    build_sample_image(layout, "v1")
    assert cli("push", f"{layout}:v1", f"docker-archive:{tmp_path}/in.tar:hep/el8:v1").code == 0
    make_nasty_tree(tmp_path / "bad")
    good = make_nasty_tree(tmp_path / "good")
    stores = []

    def refuse_bad(tree, options, store, progress=None, warn=None):
        stores.append(store.root)
        if tree.name == "bad":
            raise OSError(errno.EIO, "Input/output error", str(tree / "f"))
        return pack_once(tree, options, store, progress, warn)

    monkeypatch.setattr(batch_command, "pack_once", refuse_bad)
    plan = tmp_path / "plan.yaml"
    plan.write_text("images:\n"
                    "  - from: docker-archive:in.tar\n    to: docker-archive:bad.tar:a/b:c\n"
                    "    tree: bad\n"
                    "  - from: docker-archive:in.tar\n    to: docker-archive:good.tar:a/b:c\n"
                    "    tree: good\n")
    result = cli("--json", "batch", plan, "--layout", tmp_path / "cache")
    assert result.code == 9, result.err
    bad, done = json.loads(result.out)["images"]
    assert bad["error"] == f"{tmp_path / 'bad' / 'f'}: Input/output error"
    assert bad["exit_code"] == 3 and done["status"] == "updated"
    assert all(store.is_relative_to(tmp_path / "cache") for store in stores), stores
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad", "cache", "good", "good.tar", "in.tar", "plan.yaml", "sample"]
    out = tmp_path / "out"
    assert cli("unpack", f"docker-archive:{tmp_path}/good.tar", out).code == 0
    assert_same_tree(good, out)


def test_dry_run_says_what_it_would_do_and_does_nothing(cli, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("tree: t\nimages:\n  - from: docker://r.example/a:1\n"
                    "    to: docker://r.example/b:1\n")
    result = cli("--json", "batch", plan, "--dry-run")
    assert result.code == 0, result.err
    images = json.loads(result.out)["images"]
    assert [(i["source"], i["destination"], i["status"]) for i in images] == [
        ("docker://r.example/a:1", "docker://r.example/b:1", "planned")]


def test_shards_cover_the_plan_exactly_once():
    jobs = [Job(i, i, None, None, (), Path("t"), None, None, "keep")  # type: ignore[arg-type]
            for i in range(1, 12)]
    slices = [shard(jobs, f"{k}/4") for k in range(1, 5)]
    assert sorted(job.number for part in slices for job in part) == list(range(1, 12))
    assert shard(jobs, "1/4") == shard(jobs, "1/4")  # deterministic


def test_a_plan_through_a_tls_registry_with_credentials(cli, secure_registry, tmp_path):
    reg = secure_registry
    flags = ("--cert-dir", str(reg.cert_dir), "--authfile", str(reg.authfile))
    area = f"batch-{uuid.uuid4().hex[:8]}"
    source = _push(cli, tmp_path, reg, f"{area}/src", flags=flags)
    tree = make_nasty_tree(tmp_path / "tree")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"tree: tree\nimages:\n  - from: {source}\n"
                    f"    to: docker://{reg.host}/{area}/dest:cvmfs\n")
    result = cli("--json", *flags, "batch", plan)
    assert result.code == 0, result.err
    assert json.loads(result.out)["images"][0]["status"] == "updated"
    done = cli(*flags, "unpack", f"docker://{reg.host}/{area}/dest:cvmfs", tmp_path / "out")
    assert done.code == 0, done.err
    assert_same_tree(tree, tmp_path / "out")


def test_archives_in_and_out_through_a_shared_layout(cli, tmp_path):
    layout = tmp_path / "sample"
    build_sample_image(layout, "v1")
    assert cli("push", f"{layout}:v1", f"docker-archive:{tmp_path}/in.tar:hep/el8:v1").code == 0
    assert cli("push", f"{layout}:v1", f"oci-archive:{tmp_path}/in-oci.tar").code == 0
    tree = make_nasty_tree(tmp_path / "tree")
    plan = tmp_path / "plan.yaml"
    plan.write_text("tree: tree\ncompress: gzip\nimages:\n"
                    "  - from: docker-archive:in.tar\n"
                    "    to: docker-archive:el8-cvmfs.tar:hep/el8:cvmfs\n"
                    "  - from: oci-archive:in-oci.tar\n"
                    "    to: oci-archive:oci-cvmfs.tar\n")
    for expected in ("updated", "unchanged"):
        result = cli("--json", "batch", plan, "--layout", tmp_path / "cache")
        assert result.code == 0, result.err
        report = json.loads(result.out)
        assert [i["status"] for i in report["images"]] == [expected] * 2
    for name in ("docker-archive:el8-cvmfs.tar", "oci-archive:oci-cvmfs.tar"):
        transport, file = name.split(":")
        out = tmp_path / f"out-{transport}"
        done = cli("unpack", f"{transport}:{tmp_path / file}", out)
        assert done.code == 0, done.err
        assert_same_tree(tree, out)


def test_images_with_max_layers_get_a_delta_on_the_next_run(cli, registry, tmp_path):
    area = f"batch-{uuid.uuid4().hex[:8]}"
    source = _push(cli, tmp_path, registry, f"{area}/src")
    tree = make_nasty_tree(tmp_path / "tree")
    dest = f"docker://{registry.host}/{area}/dest:cvmfs"
    plan = tmp_path / "plan.yaml"
    assert cli("--no-tls-verify", "run", source, tree, dest).code == 0
    (tree / "new-file").write_bytes(b"added after the first run\n")
    plan.write_text(f"tree: tree\nmax_layers: 3\nimages:\n  - from: {dest}\n    to: {dest}\n")
    result = cli("--json", "--no-tls-verify", "batch", plan, "--state", tmp_path / "state")
    assert result.code == 0, result.err
    assert json.loads(result.out)["images"][0]["status"] == "updated"
    labels = json.loads(cli("--json", "--no-tls-verify", "inspect", dest).out)["images"][0][
        "labels"]
    assert len(labels["io.cvmfs-inject.stack"].split(",")) == 2
    done = cli("--no-tls-verify", "unpack", dest, tmp_path / "out")
    assert done.code == 0, done.err
    assert_same_tree(tree, tmp_path / "out")


def test_a_platform_the_index_lacks_fails_that_image(cli, registry, tmp_path):
    area = f"batch-{uuid.uuid4().hex[:8]}"
    index = _push(cli, tmp_path, registry, f"{area}/multi", platforms=("amd64", "arm64"))
    make_nasty_tree(tmp_path / "tree")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"tree: tree\nimages:\n  - from: {index}\n"
                    f"    to: docker://{registry.host}/{area}/out:cvmfs\n"
                    "    platforms: [linux/amd64, linux/ppc64le]\n")
    result = cli("--json", "--no-tls-verify", "batch", plan)
    assert result.code == 9, result.err
    image = json.loads(result.out)["images"][0]
    assert image["status"] == "failed" and "linux/ppc64le" in image["error"]


def test_a_format_conversion_needs_no_layout_option(cli, registry, tmp_path):
    area = f"batch-{uuid.uuid4().hex[:8]}"
    source = _push(cli, tmp_path, registry, f"{area}/src", docker=True)
    make_nasty_tree(tmp_path / "tree")
    plan = tmp_path / "plan.yaml"
    dest = f"docker://{registry.host}/{area}/out:oci"
    plan.write_text(f"tree: tree\nformat: oci\nimages:\n  - from: {source}\n    to: {dest}\n")
    result = cli("--json", "--no-tls-verify", "batch", plan)
    assert result.code == 0, result.err
    top = json.loads(cli("--json", "--no-tls-verify", "inspect", dest).out)
    assert top["mediaType"] == "application/vnd.oci.image.manifest.v1+json"


def test_a_packed_layer_is_placed_by_hard_link_however_often(tmp_path):
    """Placing the layer into a store that has it already (the next image into a shared
    --layout) keeps the one hard-linked file: no copy, nothing left in the temp area; a
    damaged copy there is replaced by the packed one."""
    from cvmfs_inject.layout.store import Layout
    from cvmfs_inject.pack.options import PackOptions

    tree = make_nasty_tree(tmp_path / "tree")
    prepacked = pack_once(tree, PackOptions(), Layout.create(tmp_path / "packs"))
    source = prepacked.store.blob_path(prepacked.layer.digest)
    cache = Layout.create(tmp_path / "cache")
    target = cache.blob_path(prepacked.layer.digest)
    for _ in range(3):
        prepacked.place(cache)
        assert target.stat().st_ino == source.stat().st_ino
        assert not cache.tmp_dir.exists() or list(cache.tmp_dir.iterdir()) == []
    target.unlink()
    target.write_bytes(b"damaged")
    prepacked.place(cache)
    assert target.stat().st_ino == source.stat().st_ino
