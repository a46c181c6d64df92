"""A stack goes on at the destination: `run BASE DIR DEST --max-layers N` (and a batch
image) edits the image at DEST when DEST is BASE with a /cvmfs stack on top, so that each
update adds a delta there instead of packing a fresh base onto BASE every time.

DEST qualifies when, platform by platform, its layers below the stack are exactly BASE's
layers, the stack is its top (a layer another tool put above it could hide what the stack
holds), and its config is BASE's but for what an inject writes (our labels, the stack's
diff_ids, history and times). A new BASE (other layers, another config) or a DEST changed
since does not qualify: the update then starts a new stack on BASE, as before.
"""

from __future__ import annotations

from typing import Any

from cvmfs_inject.errors import CvmfsInjectError
from cvmfs_inject.image.edit import LABEL_GZ, LABEL_PREFIX, LABEL_TAR, stack_of
from cvmfs_inject.image.sink import ImageSink
from cvmfs_inject.image.source import Image, ImageSource, Resolved, resolve


def continue_at(sink: ImageSink, base: Resolved, platform: str | None
                ) -> tuple[ImageSource, Resolved] | None:
    """The destination as the image to edit, when it is `base` with a stack on top."""
    current = sink.current()
    if current is None:
        return None
    try:
        there = resolve(current, platform)
        if (base.index is None) != (there.index is None) or len(base.images) != len(
                there.images):
            return None
        pairs = {image.platform: image for image in there.images}
        if not all(_stacked_on(pairs.get(image.platform), image) for image in base.images):
            return None
    except CvmfsInjectError:
        return None  # whatever is wrong there, the update starts from the base
    return current, there


def _stacked_on(dest: Image | None, base: Image) -> bool:
    if dest is None or stack_of(base.manifest, base.config, "").diff_ids:
        return False  # the base has an injected layer itself: an ordinary edit of it
    stack = stack_of(dest.manifest, dest.config, "")
    if not stack.diff_ids or dest.manifest.media_type != base.manifest.media_type:
        return False
    if stack.position + len(stack.diff_ids) != len(dest.config.diff_ids):
        return False  # layers above the stack: not BASE with a stack on top
    below = dest.manifest.layers[:stack.position]
    if [layer.digest for layer in below] != [layer.digest for layer in base.manifest.layers]:
        return False
    if dest.config.diff_ids[:stack.position] != base.config.diff_ids:
        return False
    return _without_injection(dest.config.doc) == _without_injection(base.config.doc)


def _without_injection(doc: dict[str, Any]) -> dict[str, Any]:
    """A config without what an inject changes: times, history, diff_ids, our labels."""
    kept = {k: v for k, v in doc.items() if k not in ("created", "history", "rootfs")}
    container = dict(kept.get("config") or {})
    labels = {k: v for k, v in (container.get("Labels") or {}).items()
              if k not in (LABEL_TAR, LABEL_GZ) and not k.startswith(LABEL_PREFIX)}
    container["Labels"] = labels or None
    kept["config"] = container
    return kept
