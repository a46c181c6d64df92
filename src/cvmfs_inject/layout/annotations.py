"""The annotations cvmfs-inject writes on index.json entries, beside the ref name.

They describe a pulled image for a later `push --format keep`: the format it came in, and
the original Docker v2s2 manifest and config kept beside it (`commands.original`), which
gc must keep while an entry names them, and which name an image only while it is unchanged.
"""

from __future__ import annotations

from cvmfs_inject.oci.model import Descriptor

SOURCE_FORMAT = "io.cvmfs-inject.source-format"
SOURCE_MANIFEST = "io.cvmfs-inject.source-manifest"
SOURCE_CONFIG = "io.cvmfs-inject.source-config"
KEPT_ORIGINALS = (SOURCE_MANIFEST, SOURCE_CONFIG)
SOURCE_OF = "io.cvmfs-inject.source-of"  # the digest the originals are the originals of

# On the index.json of a delta archive (`layout.archive`): the image it was cut against.
DELTA_SINCE = "io.cvmfs-inject.delta.since"  # its manifest or index digest
DELTA_SINCE_NAME = "io.cvmfs-inject.delta.since-name"  # its tag, for messages


def unchanged_original(desc: Descriptor) -> bool:
    """The tag still names the image as it was pulled, and its original bytes are kept."""
    annotations = desc.annotations
    return annotations.get(SOURCE_OF) == desc.digest and SOURCE_MANIFEST in annotations


def forget_originals(annotations: dict[str, str]) -> dict[str, str]:
    """The annotations of an image that no longer is its original."""
    return {k: v for k, v in annotations.items() if k not in (*KEPT_ORIGINALS, SOURCE_OF)}
