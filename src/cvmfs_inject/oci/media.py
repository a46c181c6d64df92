"""Media types we read and write, with predicates over the OCI and Docker families."""

from __future__ import annotations


class MediaType:
    """The media type strings, defined once; predicates say what kind of document one names."""

    OCI_INDEX = "application/vnd.oci.image.index.v1+json"
    OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
    OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
    OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
    OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
    OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
    OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
    DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
    DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
    DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

    INDEXES = frozenset({OCI_INDEX, DOCKER_LIST})
    MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
    CONFIGS = frozenset({OCI_CONFIG, DOCKER_CONFIG})

    @staticmethod
    def is_index(media_type: str) -> bool:
        return media_type in MediaType.INDEXES

    @staticmethod
    def is_manifest(media_type: str) -> bool:
        return media_type in MediaType.MANIFESTS

    @staticmethod
    def is_document(media_type: str) -> bool:
        """An index, a manifest or a config: JSON read whole, never a layer."""
        return (media_type in MediaType.INDEXES or media_type in MediaType.MANIFESTS
                or media_type in MediaType.CONFIGS)

    @staticmethod
    def is_docker(media_type: str) -> bool:
        return media_type.startswith("application/vnd.docker.")
