"""Tests for cvmfs_inject.oci.schema: our schemas and the extra rules, on OCI and Docker documents.

The verdicts on OCI documents, against the official schemas too, are pinned by the corpus
(test_oci_corpus.py); these cases cover messages, paths, kind detection and Docker v2s2.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from cvmfs_inject.errors import InputError
from cvmfs_inject.oci import schema as schemas
from cvmfs_inject.oci.digest import check_digest, digest_problem, verify_problem
from cvmfs_inject.oci.schema import (
    KINDS,
    Problem,
    check_descriptor,
    check_document,
    detect_kind,
)

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


def sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def sha512(text: str) -> str:
    return "sha512:" + hashlib.sha512(text.encode()).hexdigest()


D1, D2, D3, D4 = (sha256(f"blob {i}") for i in range(1, 5))
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
EMPTY_DESC = {"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_DIGEST, "size": 2, "data": "e30="}


def desc(media_type: str, digest: str = D1, size: int = 1234, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


LAYOUT = {"imageLayoutVersion": "1.0.0"}

OCI_INDEX_DOC = {
    "schemaVersion": 2,
    "mediaType": OCI_INDEX,
    "manifests": [
        desc(OCI_MANIFEST, D1, 7143, platform={"architecture": "amd64", "os": "linux"},
             annotations={"org.opencontainers.image.ref.name": "latest"}),
        desc(OCI_MANIFEST, D2, 7682, platform={
            "architecture": "arm64", "os": "linux", "variant": "v8",
            "os.features": ["sse4"], "features": []}),
    ],
    "annotations": {"com.example.key": "value"},
}

OCI_MANIFEST_DOC = {
    "schemaVersion": 2,
    "mediaType": OCI_MANIFEST,
    "config": desc(OCI_CONFIG, D1, 7023),
    "layers": [desc(OCI_LAYER, D2, 32654), desc(OCI_LAYER, D3, 16724)],
    "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
}

OCI_ARTIFACT_DOC = {
    "schemaVersion": 2,
    "mediaType": OCI_MANIFEST,
    "artifactType": "application/vnd.example.sbom.v1+json",
    "config": EMPTY_DESC,
    "layers": [desc("application/vnd.example.sbom.v1+json", sha512("sbom"), 4)],
    "subject": desc(OCI_MANIFEST, D4, 7023),
}

OCI_CONFIG_DOC = {
    "created": "2024-05-01T12:34:56.123456789Z",
    "author": "someone@example.org",
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "User": "1000:1000",
        "ExposedPorts": {"8080/tcp": {}},
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "EMPTY="],
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": None,
        "Volumes": {"/data": {}},
        "WorkingDir": "/srv",
        "Labels": {"org.opencontainers.image.title": "demo"},
        "StopSignal": "SIGTERM",
        "OnBuild": None,
    },
    "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
    "history": [
        {"created": "2024-05-01T12:00:00Z", "created_by": "/bin/sh -c #(nop) ADD file:abc in /"},
        {"created": "2024-05-01T12:30:00+02:00", "created_by": "ENV X=1", "empty_layer": True,
         "comment": "buildkit.dockerfile.v0", "author": "me"},
        {"created_by": "RUN make"},
    ],
    "container_config": {"Hostname": "abc"},
    "docker_version": "24.0.7",
}

DOCKER_MANIFEST_DOC = {
    "schemaVersion": 2,
    "mediaType": DOCKER_MANIFEST,
    "config": desc(DOCKER_CONFIG, D1, 1472),
    "layers": [
        desc(DOCKER_LAYER, D2, 2811478),
        desc(DOCKER_FOREIGN, D3, 100, urls=["https://example.org/layer.tar.gz"]),
    ],
}

DOCKER_LIST_DOC = {
    "schemaVersion": 2,
    "mediaType": DOCKER_LIST,
    "manifests": [
        desc(DOCKER_MANIFEST, D1, 528, platform={"architecture": "amd64", "os": "linux"}),
        desc(DOCKER_MANIFEST, D2, 528, platform={
            "architecture": "amd64", "os": "windows", "os.version": "10.0.17763.1",
            "os.features": ["win32k"]}),
    ],
}

DOCKER_CONFIG_DOC = {
    "architecture": "amd64",
    "os": "linux",
    "created": "2023-02-03T04:05:06.789Z",
    "container": "3ad2b9d6c0f2",
    "docker_version": "20.10.21",
    "config": {
        "Hostname": "", "Domainname": "", "User": "", "AttachStdin": False,
        "ExposedPorts": None, "Env": ["PATH=/usr/bin:/bin"], "Cmd": ["bash"],
        "Image": D1, "Volumes": None, "WorkingDir": "", "Entrypoint": None,
        "OnBuild": None, "Labels": None,
    },
    "container_config": {
        "Env": None, "Cmd": ["/bin/sh", "-c", "#(nop) CMD [\"bash\"]"], "Labels": {},
        "OnBuild": None,
    },
    "rootfs": {"type": "layers", "diff_ids": [D3]},
    "history": [{"created": "2023-02-03T04:05:06Z", "created_by": "CMD bash",
                 "empty_layer": True}],
}


def raw(doc: Any) -> bytes:
    return json.dumps(doc, indent=2).encode()


def modified(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Copy doc with the "/"-separated path (list indexes as numbers) set to value, or deleted."""
    out = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
    target: Any = out
    for part in parents:
        target = target[part]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return out


DELETE = object()

VALID = [
    ("layout", LAYOUT, "layout", None),
    ("index-minimal", {"schemaVersion": 2, "manifests": []}, "index", None),
    ("index-two-platforms", OCI_INDEX_DOC, "index", OCI_INDEX),
    ("manifest-minimal", {"schemaVersion": 2, "config": desc(OCI_CONFIG),
                          "layers": [desc(OCI_LAYER, D2)]}, "manifest", None),
    ("manifest-realistic", OCI_MANIFEST_DOC, "manifest", OCI_MANIFEST),
    ("manifest-artifact-v1.1", OCI_ARTIFACT_DOC, "manifest", None),
    ("config-minimal", {"architecture": "arm64", "os": "linux",
                        "rootfs": {"type": "layers", "diff_ids": []}}, "config", None),
    ("config-realistic", OCI_CONFIG_DOC, "config", OCI_CONFIG),
    ("config-null-labels", modified(OCI_CONFIG_DOC, "config/Labels", None), "config", None),
    ("descriptor", desc(OCI_MANIFEST), "descriptor", None),
    ("descriptor-embedded-data", EMPTY_DESC | {"annotations": {"a": "b"}, "urls": ["https://x/"]},
     "descriptor", None),
    ("descriptor-empty-data", desc("text/plain", sha256(""), 0, data=""), "descriptor", None),
    ("docker-manifest", DOCKER_MANIFEST_DOC, "manifest", DOCKER_MANIFEST),
    ("docker-manifest-list", DOCKER_LIST_DOC, "index", DOCKER_LIST),
    ("docker-config", DOCKER_CONFIG_DOC, "config", DOCKER_CONFIG),
]


@pytest.mark.parametrize(("doc", "kind", "media_type"),
                         [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_documents_pass(doc: dict[str, Any], kind: str, media_type: str | None) -> None:
    assert check_document(raw(doc), kind, media_type=media_type) == []
    assert detect_kind(doc) == kind
    assert check_document(raw(doc), media_type=media_type) == []  # kind detected


INVALID = [
    # id, document (dict or raw bytes), kind, media_type, expected message fragment
    ("missing-required", modified(OCI_MANIFEST_DOC, "config", DELETE), "manifest", None,
     "schema: 'config' is a required property"),
    ("missing-in-descriptor", modified(OCI_MANIFEST_DOC, "layers/1/digest", DELETE), "manifest",
     None, "schema: 'digest' is a required property at layers[1]"),
    ("wrong-schema-version", modified(OCI_INDEX_DOC, "schemaVersion", 1), "index", None,
     "2 was expected at schemaVersion"),
    ("uppercase-hex", modified(OCI_MANIFEST_DOC, "layers/1/digest", D2.upper().replace(
        "SHA256", "sha256")), "manifest", None, "must be lowercase hex at layers[1].digest"),
    ("sha256-63-chars", modified(OCI_MANIFEST_DOC, "config/digest", D1[:-1]), "manifest", None,
     "sha256 needs 64 lowercase hex characters, got 63 at config.digest"),
    ("sha512-wrong-length", modified(OCI_INDEX_DOC, "manifests/0/digest", sha512("x") + "00"),
     "index", None, "sha512 needs 128 lowercase hex characters, got 130"),
    ("docker-unknown-algorithm", modified(DOCKER_MANIFEST_DOC, "layers/0/digest",
                                          "md5:" + "0" * 32), "manifest", None,
     "cannot verify md5:" + "0" * 32 + ": unsupported digest algorithm 'md5' (only sha256 "
     "and sha512 can be verified) at layers[0].digest"),
    ("manifest-without-layers", modified(OCI_MANIFEST_DOC, "layers", []), "manifest", None,
     "schema: [] should be non-empty at layers"),
    ("digest-not-hex", desc(OCI_LAYER, "sha256:" + "g" * 64), "descriptor", None,
     "sha256 needs 64 lowercase hex characters at digest"),
    ("digest-grammar", desc(OCI_LAYER, "sha256"), "descriptor", None,
     "expected <algorithm>:<encoded> at digest"),
    ("digest-trailing-newline", desc(OCI_LAYER, D1 + "\n"), "descriptor", None,
     "expected <algorithm>:<encoded>"),
    ("diff-id-bad", modified(OCI_CONFIG_DOC, "rootfs/diff_ids/1", "sha256:abc"), "config", None,
     "got 3 at rootfs.diff_ids[1]"),
    ("env-without-equals", modified(OCI_CONFIG_DOC, "config/Env/1", "NOEQUALS"), "config", None,
     "Env entry 'NOEQUALS' is not KEY=value at config.Env[1]"),
    ("env-empty-key", modified(DOCKER_CONFIG_DOC, "config/Env/0", "=x"), "config", DOCKER_CONFIG,
     "is not KEY=value at config.Env[0]"),
    ("data-not-base64", EMPTY_DESC | {"data": "e3!="}, "descriptor", None,
     "data is not valid base64"),
    ("data-without-padding", EMPTY_DESC | {"data": "e30"}, "descriptor", None,
     "data is not padded base64"),
    ("data-noncanonical", EMPTY_DESC | {"data": "e31="}, "descriptor", None,
     "not canonical base64"),
    ("data-length-not-size", EMPTY_DESC | {"size": 3}, "descriptor", None,
     "data decodes to 2 bytes but size is 3"),
    ("data-digest-mismatch", modified(OCI_ARTIFACT_DOC, "config/digest", D1), "manifest", None,
     f"data does not match digest: its digest is {EMPTY_JSON_DIGEST} at config.data"),
    ("size-not-integer", desc(OCI_LAYER, size="12"), "descriptor", None,
     "'12' is not of type 'integer' at size"),
    ("media-type-mismatch", OCI_MANIFEST_DOC, "manifest", OCI_INDEX,
     f"media type mismatch: descriptor says {OCI_INDEX}, document says {OCI_MANIFEST}"),
    ("wrong-own-media-type", modified(OCI_MANIFEST_DOC, "mediaType", OCI_INDEX), "manifest",
     None, f"'{OCI_MANIFEST}' was expected at mediaType"),
    ("bad-media-type", modified(OCI_MANIFEST_DOC, "layers/0/mediaType", "tar"), "manifest",
     None, "does not match"),
    ("media-type-trailing-newline", desc("text/plain\n"), "descriptor", None,
     "does not match"),
    ("annotation-not-string", modified(OCI_INDEX_DOC, "annotations", {"org.a": 1}), "index",
     None, "1 is not of type 'string' at annotations[\"org.a\"]"),
    ("platform-missing-os", modified(OCI_INDEX_DOC, "manifests/1/platform/os", DELETE), "index",
     None, "'os' is a required property at manifests[1].platform"),
    ("artifact-empty-config-needs-type", modified(OCI_ARTIFACT_DOC, "artifactType", DELETE),
     "manifest", None, "'artifactType' is a required property"),
    ("config-missing-rootfs", modified(OCI_CONFIG_DOC, "rootfs", DELETE), "config", None,
     "'rootfs' is a required property"),
    ("config-rootfs-type", modified(OCI_CONFIG_DOC, "rootfs/type", "tarball"), "config", None,
     "'layers' was expected at rootfs.type"),
    ("config-created", modified(OCI_CONFIG_DOC, "created", "yesterday"), "config", None,
     "at created"),
    ("config-oci-env-null", modified(OCI_CONFIG_DOC, "config/Env", None), "config", OCI_CONFIG,
     "None is not of type 'array' at config.Env"),
    ("layout-version", {"imageLayoutVersion": "1.1.0"}, "layout", None,
     "'1.0.0' was expected at imageLayoutVersion"),
    ("invalid-json", b'{\n  "schemaVersion": 2,\n  "layers": [,]\n}', "manifest", None,
     "invalid JSON: Expecting value (line 3 column 14)"),
    ("invalid-utf8", b'{"a":\n "\xff"}', None, None,
     "invalid JSON: invalid UTF-8 byte 0xff (line 2 column 3)"),
    ("json-nan", b'{"a": "NaN",\n "size": NaN}', None, None,
     "invalid JSON: NaN is not a JSON value (line 2 column 10)"),
    ("json-bom", b"\xef\xbb\xbf{}", "layout", None, "Unexpected UTF-8 BOM (line 1 column 1)"),
    ("json-empty", b"", "layout", None, "invalid JSON: Expecting value (line 1 column 1)"),
    ("json-too-deep", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "config", None,
     "invalid JSON: nested too deeply"),
    ("top-level-array", b"[]", None, None, "top level must be a JSON object, not an array"),
    ("unknown-kind", {"hello": "world"}, None, None,
     "cannot tell what kind of document this is; pass --kind"),
    ("docker-oci-layer", modified(DOCKER_MANIFEST_DOC, "layers/0/mediaType", OCI_LAYER),
     "manifest", None, f"'{OCI_LAYER}' is not one of"),
    ("docker-oci-config", modified(DOCKER_MANIFEST_DOC, "config/mediaType", OCI_CONFIG),
     "manifest", None, f"'{DOCKER_CONFIG}' was expected at config.mediaType"),
    ("docker-schema-version-decimal", modified(DOCKER_MANIFEST_DOC, "schemaVersion", 2.0),
     "manifest", None, "2.0 is not of type 'integer' at schemaVersion"),
    ("docker-no-media-type", modified(DOCKER_MANIFEST_DOC, "mediaType", DELETE), "manifest",
     DOCKER_MANIFEST, "'mediaType' is a required property"),
    ("docker-list-no-platform", modified(DOCKER_LIST_DOC, "manifests/0/platform", DELETE),
     "index", None, "'platform' is a required property at manifests[0]"),
    ("docker-config-bad-labels", modified(DOCKER_CONFIG_DOC, "config/Labels", ["a"]), "config",
     DOCKER_CONFIG, "is not of type 'object', 'null' at config.Labels"),
]


@pytest.mark.parametrize(("doc", "kind", "media_type", "expected"),
                         [v[1:] for v in INVALID], ids=[v[0] for v in INVALID])
def test_invalid_documents_are_rejected(doc: Any, kind: str | None, media_type: str | None,
                                        expected: str) -> None:
    data = doc if isinstance(doc, bytes) else raw(doc)
    problems = check_document(data, kind, media_type=media_type, where="blobs/sha256/ab12")
    assert problems, "expected at least one problem"
    assert all(isinstance(p, Problem) and p.where == "blobs/sha256/ab12" for p in problems)
    assert all("\n" not in p.message for p in problems)
    messages = [p.message for p in problems]
    assert any(expected in m for m in messages), messages


def test_multiple_errors_are_reported_together() -> None:
    doc = modified(OCI_MANIFEST_DOC, "schemaVersion", 3)
    doc = modified(doc, "layers/0/digest", D2[:-2])
    doc = modified(doc, "layers/1/size", "5")
    problems = check_document(raw(doc), "manifest", where="m.json")
    assert len(problems) >= 3
    text = "\n".join(map(str, problems))
    assert "m.json: schema: 2 was expected at schemaVersion" in text
    assert "layers[0].digest" in text and "layers[1].size" in text


def test_digest_pattern_error_is_not_reported_twice() -> None:
    problems = check_document(raw(desc(OCI_LAYER, "not-a-digest")), "descriptor")
    assert [p.message for p in problems] == [
        "invalid digest 'not-a-digest': expected <algorithm>:<encoded> at digest"]


def test_schema_problems_are_sorted_by_path() -> None:
    doc = {"schemaVersion": 2, "config": desc(OCI_CONFIG, size=1.5),
           "layers": [desc(OCI_LAYER, size=1.5) for _ in range(11)]}
    messages = [p.message for p in check_document(raw(doc), "manifest")]
    paths = [m.rsplit(" at ", 1)[1] for m in messages]
    assert paths == ["config.size"] + [f"layers[{i}].size" for i in range(11)]


@pytest.mark.parametrize(("digest", "expected"), [
    (D1, None),
    (sha512("x"), None),
    ("sha256:" + "A" * 64, "must be lowercase hex"),
    (D1[:-1], "got 63"),
    (sha512("x")[:-1], "128 lowercase hex characters, got 127"),
    ("blake3:" + "0" * 64, None),
    ("sha384:" + "0" * 96, None),
    ("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8", None),
    ("SHA256:" + "0" * 64, "expected <algorithm>:<encoded>"),
    ("sha256:", "expected <algorithm>:<encoded>"),
    (" " + D1, "expected <algorithm>:<encoded>"),
    (42, "must be a string"),
], ids=["sha256", "sha512", "upper", "short256", "short512", "blake3", "sha384", "multihash",
        "upper-alg", "empty-encoded", "leading-space", "not-a-string"])
def test_digest_problem(digest: Any, expected: str | None) -> None:
    """What a document may carry: the grammar, and the encoding of registered algorithms."""
    result = digest_problem(digest)
    if expected is None:
        assert result is None
    else:
        assert result is not None and expected in result


@pytest.mark.parametrize(("digest", "expected"), [
    (D1, None),
    (sha512("x"), None),
    ("sha384:" + "0" * 96, "cannot verify sha384:" + "0" * 96 + ": unsupported digest "
     "algorithm 'sha384' (only sha256 and sha512 can be verified)"),
    ("sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
     "unsupported digest algorithm 'sha256+b64u'"),
    ("sha256:" + "A" * 64, "must be lowercase hex"),
    ("nocolon", "expected <algorithm>:<encoded>"),
], ids=["sha256", "sha512", "sha384", "sha256+b64u", "upper", "grammar"])
def test_verify_problem_and_check_digest(digest: str, expected: str | None) -> None:
    """What the tool can read and verify: only sha256 and sha512, validly encoded."""
    result = verify_problem(digest)
    if expected is None:
        assert result is None
        assert check_digest(digest) == digest
    else:
        assert result is not None and expected in result
        with pytest.raises(InputError, match=re.escape(result)):
            check_digest(digest)


@pytest.mark.parametrize(("doc", "kind"), [
    ({"mediaType": OCI_INDEX, "manifests": []}, "index"),
    ({"mediaType": DOCKER_LIST}, "index"),
    ({"mediaType": OCI_MANIFEST}, "manifest"),
    ({"mediaType": DOCKER_MANIFEST}, "manifest"),
    ({"rootfs": {}}, "config"),
    ({"imageLayoutVersion": "1.0.0"}, "layout"),
    (desc(OCI_LAYER), "descriptor"),
    ({"schemaVersion": 2, "manifests": []}, "index"),
    ({"schemaVersion": 2, "config": {}, "layers": []}, "manifest"),
    ({"schemaVersion": 2, "mediaType": "x/y", "digest": D1, "size": 1}, None),
    ({"schemaVersion": 1, "fsLayers": []}, None),
    ({}, None),
], ids=["oci-index", "docker-list", "oci-manifest", "docker-manifest", "config", "layout",
        "descriptor", "index-shape", "manifest-shape", "descriptor-with-version", "v2s1",
        "empty"])
def test_detect_kind(doc: dict[str, Any], kind: str | None) -> None:
    assert detect_kind(doc) == kind


def test_check_descriptor_for_layout_walker() -> None:
    assert check_descriptor(desc(OCI_MANIFEST), "index.json manifests[0]") == []
    assert check_descriptor({"mediaType": OCI_MANIFEST}, "x") == []  # schema's business
    bad = EMPTY_DESC | {"digest": "sha256:" + "F" * 64, "data": "e30"}
    problems = check_descriptor(bad, "index.json manifests[0]")
    assert [str(p) for p in problems] == [
        "index.json manifests[0]: invalid digest 'sha256:" + "F" * 64
        + "': sha256 encoding must be lowercase hex at digest",
        "index.json manifests[0]: data is not padded base64 (length 3 is not a multiple of 4)"
        " at data",
    ]
    assert check_descriptor([], "x")[0].message == "descriptor must be a JSON object, not an array"


def test_media_type_picks_docker_or_oci_config_schema() -> None:
    docker_only = modified(DOCKER_CONFIG_DOC, "config/Env", None)
    assert check_document(raw(docker_only), "config", media_type=DOCKER_CONFIG) == []
    assert check_document(raw(docker_only), "config", media_type=OCI_CONFIG) != []


def test_duplicate_label_keys_are_an_oci_rule() -> None:
    """annotations.md: keys MUST be unique; Docker v2s2 keeps its own rules."""
    for doc, media_type in ((OCI_CONFIG_DOC, OCI_CONFIG), (DOCKER_CONFIG_DOC, DOCKER_CONFIG)):
        text = raw(modified(doc, "config/Labels", {"a": "1"})).decode()
        data = text.replace('"a": "1"', '"a": "1", "b": "2", "a": "3"').encode()
        messages = [p.message for p in check_document(data, "config", media_type=media_type)]
        if media_type == OCI_CONFIG:
            assert messages == [
                "duplicate key 'a' (annotation keys MUST be unique) at config.Labels"]
        else:
            assert messages == []


def test_descriptor_document_media_type_is_not_compared() -> None:
    """A descriptor's own mediaType names its target, not the descriptor document."""
    doc = desc(OCI_MANIFEST)
    assert check_document(raw(doc), "descriptor",
                          media_type="application/vnd.oci.descriptor.v1+json") == []


def test_unknown_kind_raises_input_error() -> None:
    with pytest.raises(InputError, match="unknown document kind 'blob'"):
        check_document(raw(LAYOUT), "blob")


def test_long_values_are_shortened_to_one_line() -> None:
    doc = {"schemaVersion": 2, "config": desc(OCI_CONFIG), "layers": {"x" * 1000: "y\n" * 500}}
    (problem,) = check_document(raw(doc), "manifest")
    assert len(problem.message) < 400 and "\n" not in problem.message


def test_problem_str() -> None:
    assert str(Problem("index.json", "boom")) == "index.json: boom"


# --- the schema files themselves ------------------------------------------------------------

SCHEMA_FILES = ["oci-layout.json", "oci-descriptor.json", "oci-index.json", "oci-manifest.json",
                "oci-config.json", "docker-manifest.json", "docker-manifest-list.json",
                "docker-config.json"]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_files_are_standalone_2020_12(name: str) -> None:
    schema = json.loads((SCHEMA_DIR / name).read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://cvmfs-inject.invalid/schemas/{name}"
    for ref in _refs(schema):
        assert ref.startswith("#/$defs/"), ref
        assert ref.removeprefix("#/$defs/") in schema["$defs"], ref


@pytest.mark.parametrize("name", sorted(p.name for p in SCHEMA_DIR.glob("*.json")))
def test_every_shipped_schema_is_a_valid_schema(name: str) -> None:
    """The code compiles them without this check (`schema._validator`): it is made here."""
    Draft202012Validator.check_schema(json.loads((SCHEMA_DIR / name).read_text()))


def test_every_kind_has_a_schema() -> None:
    for kind in KINDS:
        assert schemas._schema_name(kind, {}, None) in SCHEMA_FILES
