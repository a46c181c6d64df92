"""Small sample images and trees built with our own packer: no download, no daemon.

`make demo` and the test suite both need a base image and a shrinkwrap-shaped tree on a
machine with no network. The images are real (several layers, a config with history and
labels) in either OCI or Docker v2s2 media types, optionally as a multi-platform index.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.jsondoc import canonical_json
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import REF_NAME, Descriptor
from cvmfs_inject.pack.options import PackOptions
from cvmfs_inject.pack.packer import pack

SAMPLE_EPOCH = 1_700_000_000


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, (SAMPLE_EPOCH, SAMPLE_EPOCH))


def _layer(layout: Layout, mount: str, files: dict[str, bytes], docker: bool
           ) -> tuple[Descriptor, str]:
    with tempfile.TemporaryDirectory() as scratch:
        _write_files(Path(scratch), files)
        with layout.writer() as writer:
            packed = pack(Path(scratch), writer, PackOptions(
                mount_point=mount, source_date_epoch=SAMPLE_EPOCH))
            desc = writer.commit()
    media_type = MediaType.DOCKER_LAYER_GZIP if docker else MediaType.OCI_LAYER_GZIP
    return desc.replace(media_type=media_type), packed.diff_id


def _image(layout: Layout, arch: str, docker: bool, layers: int) -> Descriptor:
    descs, diff_ids, history = [], [], []
    contents = [
        ("/etc", {"os-release": b'NAME="cvmfs-inject sample"\nID=sample\n',
                  "hostname": b"sample\n"}),
        ("/usr/share/sample", {"README": b"A sample base image made by cvmfs-inject.\n",
                               f"arch-{arch}": arch.encode() + b"\n"}),
        ("/opt/app", {"bin/run.sh": b"#!/bin/sh\necho hello\n"}),
    ]
    for mount, files in contents[:layers]:
        desc, diff_id = _layer(layout, mount, files, docker)
        descs.append(desc.to_dict())
        diff_ids.append(diff_id)
        history.append({"created": "2023-11-14T22:13:20Z", "created_by": f"sample: add {mount}"})
    history.insert(1, {"created": "2023-11-14T22:13:20Z", "created_by": "sample: ENV",
                       "empty_layer": True})
    config = {
        "architecture": arch, "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"], "Labels": {"org.example.sample": "yes"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config_type = MediaType.DOCKER_CONFIG if docker else MediaType.OCI_CONFIG
    manifest_type = MediaType.DOCKER_MANIFEST if docker else MediaType.OCI_MANIFEST
    config_desc = layout.put_bytes(canonical_json(config), config_type)
    manifest = {"schemaVersion": 2, "mediaType": manifest_type,
                "config": config_desc.to_dict(), "layers": descs}
    return layout.put_bytes(canonical_json(manifest), manifest_type)


def build_sample_image(path: str | Path, tag: str = "latest", *, docker: bool = False,
                       platforms: tuple[str, ...] = ("amd64",), layers: int = 2) -> Descriptor:
    """Write a sample image (an index when several platforms are given) under `tag`."""
    layout = Layout.create(path)
    with layout.writing():
        manifests = []
        for arch in platforms:
            desc = _image(layout, arch, docker, layers)
            manifests.append(desc.replace(extra={"platform": {"architecture": arch,
                                                              "os": "linux"}}))
        if len(manifests) == 1:
            top = manifests[0].replace(extra={})
        else:
            index_type = MediaType.DOCKER_LIST if docker else MediaType.OCI_INDEX
            index = {"schemaVersion": 2, "mediaType": index_type,
                     "manifests": [m.to_dict() for m in manifests]}
            top = layout.put_bytes(canonical_json(index), index_type)
        layout.set_tag(tag, top.with_annotations({REF_NAME: tag}))
    return top


def build_sample_tree(root: str | Path) -> Path:
    """A tiny shrinkwrap-shaped tree: a content store of hard links, symlinks, odd names."""
    base = Path(root)
    store = base / ".data" / "ab"
    _write_files(base, {
        ".data/ab/cdef0123": b"#!/bin/sh\necho setup\n",
        ".data/12/3456789a": b"shared library bytes\n" * 100,
        ".provenance/manifest.txt": b"sample provenance\n",
    })
    os.chmod(store / "cdef0123", 0o755)
    for repo in ("sft.cern.ch", "atlas.cern.ch"):
        lib = base / repo / "lcg" / "releases"
        lib.mkdir(parents=True, exist_ok=True)
        os.link(store / "cdef0123", lib / "setup.sh")
        os.link(base / ".data/12/3456789a", lib / "libsample.so")
        os.symlink("releases/setup.sh", lib.parent / "latest-setup.sh")
        (lib / "name with spaces é.txt").write_bytes(b"unicode and spaces\n")
    for path in sorted(base.rglob("*"), reverse=True):
        os.utime(path, (SAMPLE_EPOCH, SAMPLE_EPOCH), follow_symlinks=False)
    os.utime(base, (SAMPLE_EPOCH, SAMPLE_EPOCH))
    return base
