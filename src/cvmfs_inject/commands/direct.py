"""Registry-direct mode: refresh /cvmfs in a remote image without downloading its base layers.

Only the manifest (or index) and the config(s) are read. The layer is packed locally with
the same packer and the same edits as the layout path (`injector.apply`, into a scratch
store), so the same tree gives the same digests either way. Then the new layer and configs
are uploaded, base blobs are referenced (or mounted / streamed when the destination is
another repository / registry), and the manifests are written last: the destination tag
changes only after every blob it references is confirmed present.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cvmfs_inject.commands.inject import InjectReport, Progress, Warn, apply, extract_injected
from cvmfs_inject.errors import InputError, UsageError, ValidationFailed
from cvmfs_inject.image.refs import ImageRef
from cvmfs_inject.image.source import load_images
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import Descriptor, ImageConfig, Index, Manifest
from cvmfs_inject.oci.schema import check_document
from cvmfs_inject.pack.options import PackOptions
from cvmfs_inject.registry.client import RegistryClient
from cvmfs_inject.registry.credentials import Credentials, load_credentials
from cvmfs_inject.skopeo.command import RegistryOptions

# upload_progress(total bytes) -> a context yielding a callback(bytes sent), or None
UploadProgress = Callable[[int], AbstractContextManager[Callable[[int], None] | None]]


@contextmanager
def _no_progress(total: int) -> Iterator[None]:
    yield None


@dataclass(frozen=True)
class Access:
    """How to reach registries in this mode: TLS settings plus explicit credentials, if any."""

    options: RegistryOptions
    credentials: Credentials | None = None
    ca_file: Path | None = None

    def client(self, ref: ImageRef) -> RegistryClient:
        credentials = self.credentials or load_credentials(ref.registry, self.options.authfile)
        return RegistryClient(ref.registry, tls_verify=self.options.tls_verify,
                              cert_dir=self.options.cert_dir, ca_file=self.ca_file,
                              credentials=credentials)


class RemoteSource:
    """`images.ImageSource` over the registry API: manifests by digest, configs as blobs."""

    def __init__(self, client: RegistryClient, ref: ImageRef) -> None:
        self.client = client
        self.ref = ref
        self.raw: dict[str, tuple[bytes, str]] = {}

    def top(self) -> Descriptor:
        reference = self.ref.digest or self.ref.tag or "latest"
        raw, media_type, digest = self.client.get_manifest(self.ref.repository, reference)
        if not (MediaType.is_index(media_type) or MediaType.is_manifest(media_type)):
            media_type = _sniff(raw, media_type)
        self.raw[digest] = (raw, media_type)
        return Descriptor(media_type, digest, len(raw))

    def document(self, desc: Descriptor) -> bytes:
        cached = self.raw.get(desc.digest)
        if cached is None:
            raw, media_type, _ = self.client.get_manifest(self.ref.repository, desc.digest)
            cached = self.raw[desc.digest] = (raw, media_type)
        if len(cached[0]) != desc.size:
            raise InputError(f"{self.ref}: manifest {desc.digest} has {len(cached[0])} bytes, "
                             f"its descriptor says {desc.size}")
        return cached[0]

    def manifest(self, desc: Descriptor) -> Manifest:
        return Manifest.parse(self.document(desc), f"{self.ref}@{desc.digest}", desc.media_type)

    def index(self, desc: Descriptor) -> Index:
        return Index.parse(self.document(desc), f"{self.ref}@{desc.digest}", desc.media_type)

    def config(self, manifest_desc: Descriptor, manifest: Manifest) -> ImageConfig:
        config = manifest.config
        raw = self.client.get_blob(self.ref.repository, config.digest, config.size)
        return ImageConfig.parse(raw, f"{self.ref} config {config.digest}")


def _sniff(raw: bytes, media_type: str) -> str:
    """Registries may answer with a generic Content-Type; the document's shape decides."""
    try:
        doc = json.loads(raw)
    except ValueError:
        raise InputError(f"registry returned a non-JSON manifest ({media_type})") from None
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(declared, str) and (MediaType.is_index(declared)
                                      or MediaType.is_manifest(declared)):
        return declared
    if isinstance(doc, dict) and "manifests" in doc:
        return MediaType.OCI_INDEX
    return MediaType.OCI_MANIFEST


def destination(src: ImageRef, dest: ImageRef | None, new_tag: str | None) -> ImageRef:
    if dest is not None:
        if not dest.is_registry:
            raise UsageError(f"--dest {dest}: registry-direct mode writes to docker://; use "
                             "`run` for archives")
        if new_tag:
            raise UsageError("--tag and --dest exclude each other: put the tag in --dest")
        if dest.digest:
            raise UsageError(f"--dest {dest}: name a tag, not a digest")
        return dest
    if new_tag:
        return ImageRef("docker", src.path, new_tag)
    if src.digest:
        raise UsageError(f"{src} names a digest: give --tag or --dest for the result")
    return src


@contextmanager
def _scratch() -> Iterator[Layout]:
    with tempfile.TemporaryDirectory(prefix="cvmfs-inject-direct-") as scratch:
        yield Layout.create(Path(scratch) / "layout")


def inject_remote(src: ImageRef, tree: Path | None, options: PackOptions, access: Access, *,
                  dest: ImageRef | None = None, new_tag: str | None = None,
                  platform: str | None = None, init_only: bool = False,
                  progress: Progress | None = None, warn: Warn | None = None,
                  upload_progress: UploadProgress | None = None) -> InjectReport:
    """Inject into a registry image; the result goes to `dest`, `new_tag` or back to `src`."""
    target = destination(src, dest, new_tag)
    src_client = access.client(src)
    same_registry = target.registry == src.registry
    dest_client = src_client if same_registry else access.client(target)
    source = RemoteSource(src_client, src)
    top = source.top()
    with _scratch() as store:
        outcome = apply(store, source, top, tree, options, reference=str(target),
                        platform=platform, init_only=init_only, progress=progress, warn=warn)
        if outcome.new_top is None and target == src:
            return outcome.report
        publisher = _Publisher(store, source, src_client, dest_client, src, target,
                               upload_progress or _no_progress)
        published = outcome.new_top or top
        publisher.publish(published)
        outcome.report.reference = str(target)
        outcome.report.destination = str(target)
        outcome.report.pushed_digest = published.digest
        return outcome.report


class _Publisher:
    """Makes every blob present at the destination, then writes manifests, the tag last."""

    def __init__(self, store: Layout, source: RemoteSource, src_client: RegistryClient,
                 dest_client: RegistryClient, src: ImageRef, dest: ImageRef,
                 upload_progress: UploadProgress) -> None:
        self.upload_progress = upload_progress
        self.store = store
        self.source = source
        self.src_client = src_client
        self.dest_client = dest_client
        self.src = src
        self.dest = dest
        self.done: set[str] = set()

    def _blob(self, desc: Descriptor) -> None:
        if desc.digest in self.done:
            return
        repo = self.dest.repository
        if self.store.has_blob(desc.digest):  # new: layer or config, uploaded unless present
            with self.upload_progress(desc.size) as progress:
                self.dest_client.push_blob(repo, self.store.blob_path(desc.digest),
                                           desc.digest, desc.size, progress=progress)
        else:  # a base blob: present, else mounted (same registry) or streamed across
            self.dest_client.copy_blob_from(self.src_client, self.src.repository, repo,
                                            desc.digest, desc.size)
        self.done.add(desc.digest)

    def _document(self, desc: Descriptor) -> bytes:
        if self.store.has_blob(desc.digest):
            return self.store.read_blob(desc.digest, desc.size)
        return self.source.document(desc)

    def _new_document(self, desc: Descriptor, kind: str, problems: list[Any]) -> None:
        if self.store.has_blob(desc.digest):
            problems += check_document(self.store.read_blob(desc.digest, desc.size), kind,
                                       media_type=desc.media_type,
                                       where=f"new {kind} {desc.digest}")

    def publish(self, new_top: Descriptor) -> None:
        """Validate the new documents, make every blob present, then write the manifests."""
        repo = self.dest.repository
        manifests = self._manifest_descriptors(new_top)
        parsed = [(desc, Manifest.parse(self._document(desc), desc.digest, desc.media_type))
                  for desc in manifests]
        problems: list[Any] = []
        if MediaType.is_index(new_top.media_type):
            self._new_document(new_top, "index", problems)
        for desc, manifest in parsed:
            self._new_document(desc, "manifest", problems)
            self._new_document(manifest.config, "config", problems)
        if problems:
            raise ValidationFailed(f"{self.dest}: the injected image does not validate: "
                                   f"{problems[0]} ({len(problems)} problem(s))")
        for _, manifest in parsed:
            for blob in [manifest.config, *manifest.layers]:
                self._blob(blob)
        for desc in manifests:
            if desc.digest != new_top.digest:
                self.dest_client.put_manifest(repo, desc.digest, self._document(desc),
                                              desc.media_type)
        self.dest_client.put_manifest(repo, self.dest.tag or "latest",
                                      self._document(new_top), new_top.media_type)

    def _manifest_descriptors(self, top: Descriptor) -> list[Descriptor]:
        if MediaType.is_manifest(top.media_type):
            return [top]
        index = Index.parse(self._document(top), top.digest, top.media_type)
        return [d for d in index.manifests if MediaType.is_manifest(d.media_type)]


def unpack_remote(ref: ImageRef, target: Path, access: Access, *, force: bool = False,
                  platform: str | None = None,
                  mount_point: str | None = None, warn: Warn | None = None
                  ) -> dict[str, Any]:
    """Download only the injected layer and extract its mount-point content."""
    client = access.client(ref)
    source = RemoteSource(client, ref)
    _, images = load_images(source, source.top(), platform)

    @contextmanager
    def spooled(layer: Descriptor) -> Iterator[IO[bytes]]:
        """Download whole (digest checked at the end) before extracting a byte of it."""
        with tempfile.TemporaryFile() as spool:
            for chunk in client.open_blob(ref.repository, layer.digest):
                spool.write(chunk)
            spool.seek(0)
            yield spool

    return extract_injected(images[0], target, str(ref), force=force, mount_point=mount_point,
                            warn=warn, open_layer=spooled)
