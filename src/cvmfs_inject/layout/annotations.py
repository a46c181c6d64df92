"""The annotations cvmfs-inject writes on index.json entries, beside the ref name.

They describe a pulled image for a later `push --format keep`: the format it came in, and
the original Docker v2s2 manifest and config kept beside it (`layout.original`), which gc
must keep while an entry names them.
"""

SOURCE_FORMAT = "io.cvmfs-inject.source-format"
SOURCE_MANIFEST = "io.cvmfs-inject.source-manifest"
SOURCE_CONFIG = "io.cvmfs-inject.source-config"
KEPT_ORIGINALS = (SOURCE_MANIFEST, SOURCE_CONFIG)
SOURCE_OF = "io.cvmfs-inject.source-of"  # the digest the originals are the originals of
