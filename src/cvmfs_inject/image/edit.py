"""Pure edits of one image: swap (or append) the injected layer and re-describe the image.

Nothing here touches the disk. `edit_image` takes a manifest, its config and the new layer's
identity, and returns new manifest and config documents (or None when nothing changes);
`image.commit` writes them bottom-up and a sink publishes them, the tag last.

The injected layer is identified by its diff_id (config label `cvmfs_injection_tar`, the
name the original CernVM-FS injector writes), never by its compressed digest: a registry
may recompress layers, the uncompressed content is the stable identity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cvmfs_inject import __version__
from cvmfs_inject.errors import InputError, NotFoundError, UsageError
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import Descriptor, ImageConfig, Manifest

LABEL_TAR = "cvmfs_injection_tar"
LABEL_GZ = "cvmfs_injection_gz"
LABEL_PREFIX = "io.cvmfs-inject."
LABEL_VERSION = LABEL_PREFIX + "version"
LABEL_TREE = LABEL_PREFIX + "tree-digest"
LABEL_MOUNT = LABEL_PREFIX + "mount-point"
# a stack of two or more layers: their diff_ids, base first, comma-separated
LABEL_STACK = LABEL_PREFIX + "stack"
HISTORY_AUTHOR = "cvmfs-inject"

LAYER_MEDIA_TYPES = {
    ("oci", "gzip"): MediaType.OCI_LAYER_GZIP,
    ("oci", "zstd"): MediaType.OCI_LAYER_ZSTD,
    ("oci", "none"): MediaType.OCI_LAYER,
    ("docker", "gzip"): MediaType.DOCKER_LAYER_GZIP,
}


@dataclass(frozen=True)
class NewLayer:
    """What the packer produced: the layer's identity in both forms."""

    diff_id: str
    digest: str
    size: int
    compression: str
    mount_point: str


@dataclass(frozen=True)
class EditResult:
    manifest: dict[str, Any]
    config: dict[str, Any]
    old_diff_id: str | None
    position: int


def layer_media_type(manifest: Manifest, compression: str) -> str:
    family = "docker" if manifest.is_docker else "oci"
    media_type = LAYER_MEDIA_TYPES.get((family, compression))
    if media_type is None:
        raise UsageError(f"--compress {compression} cannot go into a Docker v2s2 image (Docker "
                         "layers are gzip only): use --compress gzip, or convert the image "
                         "to OCI first (pull, then push --format oci)")
    return media_type


def timestamp(epoch: int | None) -> str:
    """RFC 3339 UTC time: SOURCE_DATE_EPOCH when set, so the config digest is reproducible."""
    seconds = epoch if epoch is not None else int(time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def labelled_position(config: ImageConfig, where: str) -> tuple[int | None, str | None]:
    """Index in rootfs.diff_ids of the injected layer, or (None, None) on an unprepared image."""
    labelled = config.labels.get(LABEL_TAR)
    if not labelled:
        return None, None
    diff_ids = config.diff_ids
    if labelled not in diff_ids:
        raise NotFoundError(f"{where}: label {LABEL_TAR}={labelled} names a layer that is not "
                            "in this image's rootfs.diff_ids; the image was changed by another "
                            "tool. Remove the label to inject as a new layer.")
    return len(diff_ids) - 1 - diff_ids[::-1].index(labelled), labelled


def injected_position(manifest: Manifest, config: ImageConfig, where: str
                      ) -> tuple[int | None, str | None]:
    """The injected layer's index in both the manifest's layers and the config's diff_ids,
    which must agree for the position to mean the same layer in both."""
    position, labelled = labelled_position(config, where)
    if position is not None:
        check_layer_count(manifest, config, where)
    return position, labelled


def check_layer_count(manifest: Manifest, config: ImageConfig, where: str) -> None:
    """A layer's position means the same in both documents only when they agree."""
    layers, diff_ids = len(manifest.doc["layers"]), len(config.diff_ids)
    if layers != diff_ids:
        raise InputError(f"{where}: manifest has {layers} layers but its config lists "
                         f"{diff_ids} diff_ids")


def _history_layer_slots(history: list[dict[str, Any]]) -> list[int]:
    """Positions in `history` of the entries that correspond to layers (not empty_layer)."""
    return [i for i, entry in enumerate(history) if not entry.get("empty_layer")]


def edit_image(manifest: Manifest, config: ImageConfig, layer: NewLayer, *,
               created_by: str, epoch: int | None, where: str) -> EditResult | None:
    """The new manifest and config with `layer` in the injected position; None if unchanged."""
    position, old_diff_id = labelled_position(config, where)
    if old_diff_id == layer.diff_id:
        return None
    check_layer_count(manifest, config, where)
    layers = manifest.doc["layers"]
    diff_ids = config.diff_ids
    descriptor = Descriptor(layer_media_type(manifest, layer.compression), layer.digest,
                            layer.size).to_dict()
    now = timestamp(epoch)
    new_config = config.edit()
    new_manifest = manifest.edit()
    history = new_config.get("history")
    if position is None:
        position = len(layers)
        new_manifest["layers"].append(descriptor)
        new_config["rootfs"]["diff_ids"].append(layer.diff_id)
        entry = {"created": now, "created_by": created_by, "author": HISTORY_AUTHOR,
                 "comment": f"cvmfs-inject: add {layer.mount_point} layer {layer.diff_id}"}
        if isinstance(history, list):
            history.append(entry)
    else:
        old_layer = new_manifest["layers"][position]
        # keep fields we do not manage (annotations, urls) on the replaced descriptor
        kept = {k: v for k, v in old_layer.items() if k not in ("mediaType", "digest", "size")}
        new_manifest["layers"][position] = {**descriptor, **kept}
        new_config["rootfs"]["diff_ids"][position] = layer.diff_id
        entry = {"created": now, "created_by": created_by, "author": HISTORY_AUTHOR,
                 "comment": f"cvmfs-inject: UPDATE {layer.mount_point} layer from "
                            f"{old_diff_id} to {layer.diff_id}"}
        if isinstance(history, list):
            slots = _history_layer_slots(history)
            if len(slots) == len(diff_ids):
                history[slots[position]] = entry
            else:
                history.append({**entry, "empty_layer": True})
    labels = _labels(new_config)
    labels.update({
        LABEL_TAR: layer.diff_id,
        LABEL_GZ: layer.digest,
        LABEL_VERSION: __version__,
        LABEL_TREE: layer.diff_id,
        LABEL_MOUNT: layer.mount_point,
    })
    new_config["created"] = now
    return EditResult(new_manifest, new_config, old_diff_id, position)


@dataclass(frozen=True)
class Stack:
    """Where the mount point's layers are: `diff_ids[0]` (the base) at `position`, the
    deltas right above it. Empty on an image without an injected layer."""

    position: int
    diff_ids: list[str]


def stack_of(manifest: Manifest, config: ImageConfig, where: str) -> Stack:
    """The stack named by the labels: `cvmfs_injection_tar` (the base, or the single
    layer) and, for two layers or more, `io.cvmfs-inject.stack`."""
    position, base = injected_position(manifest, config, where)
    if position is None or base is None:
        return Stack(len(config.diff_ids), [])
    listed = config.labels.get(LABEL_STACK)
    if not listed:
        return Stack(position, [base])
    diff_ids = listed.split(",") if isinstance(listed, str) else []
    position = _topmost(config.diff_ids, diff_ids) if diff_ids[:1] == [base] else None
    if len(diff_ids) < 2 or position is None:
        raise InputError(f"{where}: label {LABEL_STACK} does not name the layers above the "
                         f"one {LABEL_TAR} names, in order; the image was changed by "
                         "another tool. Remove both labels to inject as a new layer.")
    return Stack(position, diff_ids)


def _topmost(diff_ids: list[str], run: list[str]) -> int | None:
    """Where `run` lies in `diff_ids`, the topmost place if it lies in several. A delta
    can be byte for byte the base (every entry changed in a way the tar headers do not
    show: mtimes that lost their fraction of a second), so the base's diff_id can come
    twice in a stack, and the base is not simply its last occurrence."""
    for start in range(len(diff_ids) - len(run), -1, -1):
        if diff_ids[start:start + len(run)] == run:
            return start
    return None


def edit_stack(manifest: Manifest, config: ImageConfig, stack: Stack, keep: int,
               layers: list[NewLayer], comments: list[str], *, created_by: str,
               epoch: int | None, where: str) -> EditResult:
    """Replace the stack by its first `keep` layers and `layers` above them."""
    check_layer_count(manifest, config, where)
    position, old = stack.position, len(stack.diff_ids)
    new_manifest, new_config = manifest.edit(), config.edit()
    kept = new_manifest["layers"][position:position + keep]
    added = [Descriptor(layer_media_type(manifest, layer.compression), layer.digest,
                        layer.size).to_dict() for layer in layers]
    if old and not keep and added:  # a new base keeps what we do not manage (annotations)
        extra = {k: v for k, v in new_manifest["layers"][position].items()
                 if k not in ("mediaType", "digest", "size")}
        added[0] = {**added[0], **extra}
    new_manifest["layers"][position:position + old] = kept + added
    diff_ids = stack.diff_ids[:keep] + [layer.diff_id for layer in layers]
    new_config["rootfs"]["diff_ids"][position:position + old] = diff_ids
    now = timestamp(epoch)
    entries = [{"created": now, "created_by": created_by, "author": HISTORY_AUTHOR,
                "comment": comment} for comment in comments]
    history = new_config.get("history")
    if isinstance(history, list):
        slots = _history_layer_slots(history)
        if len(slots) == len(config.diff_ids):
            start = slots[position] if position < len(slots) else len(history)
            end = slots[position + old - 1] + 1 if old else start
            history[start:end] = [history[slots[position + i]] for i in range(keep)]
            at = start + keep
            history[at:at] = entries
        else:
            history.append({**entries[-1], "empty_layer": True} if entries else
                           {"created": now, "created_by": created_by,
                            "author": HISTORY_AUTHOR, "empty_layer": True})
    base = new_manifest["layers"][position]
    labels = _labels(new_config)
    labels.update({LABEL_TAR: diff_ids[0], LABEL_GZ: base["digest"], LABEL_VERSION: __version__,
                   LABEL_TREE: diff_ids[-1], LABEL_MOUNT: layers[-1].mount_point
                   if layers else labels.get(LABEL_MOUNT, "/cvmfs")})
    if len(diff_ids) > 1:
        labels[LABEL_STACK] = ",".join(diff_ids)
    else:
        labels.pop(LABEL_STACK, None)
    new_config["created"] = now
    return EditResult(new_manifest, new_config, stack.diff_ids[-1] if old else None, position)


def _labels(config_doc: dict[str, Any]) -> dict[str, Any]:
    container = config_doc.get("config")
    if not isinstance(container, dict):
        container = config_doc["config"] = {}
    labels = container.get("Labels")
    if not isinstance(labels, dict):
        labels = container["Labels"] = {}
    return labels


def with_config(manifest_doc: dict[str, Any], config_desc: Descriptor) -> dict[str, Any]:
    """Point the manifest at a new config blob, keeping the config descriptor's other fields."""
    old = manifest_doc["config"]
    manifest_doc["config"] = {**old, "digest": config_desc.digest, "size": config_desc.size}
    return manifest_doc
