"""The OCI corpus: valid and invalid documents of each kind, run against our schemas and the
official image-spec v1.1.1 ones.

`tests/data/oci-corpus/<kind>/{valid,invalid}/*.json` are written from the spec's text.
Each invalid directory's `_rules.json` says, per file, which rule it breaks, whether the
official schemas reject it too ("rejects") or only the spec's prose says so ("accepts": the
schemas cannot express it, our extra rules do), and a fragment of our message, so a file
rejected for another reason fails. `_notes.json` explains the valid files that may surprise.

The official verdict is the official schemas as upstream evaluates them: formats asserted
(``uri``, ``date-time``) and patterns with ECMA-262's ``$``. jsonschema's default format
checker would silently pass both formats here (its optional packages are not installed), so
the test asserts them with the same functions our validator uses, and checks that no format
of the official schemas is left unchecked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cvmfs_inject.oci import schema as schemas
from cvmfs_inject.oci.formats import FORMATS, format_checker
from cvmfs_inject.oci.schema import KINDS, check_document, detect_kind

CORPUS = Path(__file__).resolve().parent / "data" / "oci-corpus"
OFFICIAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "oci-image-spec-schemas"
OFFICIAL_FILE = {
    "layout": "image-layout-schema.json",
    "index": "image-index-schema.json",
    "manifest": "image-manifest-schema.json",
    "config": "config-schema.json",
    "descriptor": "content-descriptor.json",
}
NOTE_FILES = {"valid": "_notes.json", "invalid": "_rules.json"}


def notes(kind: str, verdict: str) -> dict[str, dict[str, str]]:
    path = CORPUS / kind / verdict / NOTE_FILES[verdict]
    return json.loads(path.read_text()) if path.exists() else {}


def corpus_files(kind: str, verdict: str) -> list[Path]:
    return sorted(p for p in (CORPUS / kind / verdict).glob("*.json")
                  if p.name != NOTE_FILES[verdict])


CASES = [(kind, verdict, path) for kind in KINDS for verdict in ("valid", "invalid")
         for path in corpus_files(kind, verdict)]
IDS = [f"{kind}/{verdict}/{path.stem}" for kind, verdict, path in CASES]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_a_corpus_with_notes(kind: str) -> None:
    """Both verdicts are present; every invalid file names its rule, every note its file."""
    valid, invalid = corpus_files(kind, "valid"), corpus_files(kind, "invalid")
    assert len(valid) >= 2 and len(invalid) >= 5, (len(valid), len(invalid))
    rules = notes(kind, "invalid")
    assert sorted(rules) == [p.name for p in invalid]
    for name, rule in rules.items():
        assert rule["official"] in ("rejects", "accepts"), name
        assert rule["breaks"] and rule["expect"], name
    assert set(notes(kind, "valid")) <= {p.name for p in valid}


@pytest.mark.parametrize(("kind", "verdict", "path"), CASES, ids=IDS)
def test_our_verdict(kind: str, verdict: str, path: Path) -> None:
    problems = check_document(path.read_bytes(), kind, where=path.name)
    messages = [p.message for p in problems]
    if verdict == "valid":
        assert messages == []
        assert detect_kind(json.loads(path.read_bytes())) == kind
    else:
        expect = notes(kind, "invalid")[path.name]["expect"]
        assert any(expect in m for m in messages), messages


@pytest.fixture(scope="module")
def official_validators() -> dict[str, Any]:
    if not OFFICIAL_DIR.is_dir():
        pytest.skip(f"official OCI schemas not present at {OFFICIAL_DIR}")
    from jsonschema import Draft4Validator, validators
    from referencing import Registry, Resource
    from referencing.exceptions import NoSuchResource
    from referencing.jsonschema import DRAFT4

    by_name = {f.name: Resource.from_contents(json.loads(f.read_text()),
                                              default_specification=DRAFT4)
               for f in OFFICIAL_DIR.glob("*.json")}
    keyed = dict(by_name)
    keyed |= {res.contents["id"]: res for res in by_name.values() if "id" in res.contents}

    def retrieve(uri: str) -> Resource:
        # Relative refs resolve against several https://opencontainers.org/schema/... bases;
        # upstream registers each file under all of them, we match on the file name.
        name = uri.rsplit("/", 1)[-1]
        if name in by_name:
            return by_name[name]
        raise NoSuchResource(ref=uri)

    registry = Registry(retrieve=retrieve).with_resources(keyed.items())
    cls = validators.extend(Draft4Validator, {"pattern": schemas._ecma_pattern})
    return {kind: cls(by_name[name].contents, registry=registry, format_checker=format_checker())
            for kind, name in OFFICIAL_FILE.items()}


@pytest.mark.parametrize(("kind", "verdict", "path"), CASES, ids=IDS)
def test_official_verdict(official_validators: dict[str, Any], kind: str, verdict: str,
                          path: Path) -> None:
    """Valid files pass the official schemas; invalid ones fail them unless their rule is
    one only the prose states."""
    official_ok = official_validators[kind].is_valid(json.loads(path.read_bytes()))
    if verdict == "valid":
        assert official_ok
    else:
        assert official_ok == (notes(kind, "invalid")[path.name]["official"] == "accepts")


def _formats(node: Any) -> set[str]:
    if isinstance(node, dict):
        own = {node["format"]} if isinstance(node.get("format"), str) else set()
        return own.union(*(_formats(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_formats(v) for v in node))
    return set()


def test_every_official_format_is_asserted() -> None:
    if not OFFICIAL_DIR.is_dir():
        pytest.skip(f"official OCI schemas not present at {OFFICIAL_DIR}")
    used = set().union(*(_formats(json.loads(f.read_text())) for f in OFFICIAL_DIR.glob("*.json")))
    assert used and used <= set(FORMATS), used
    checker = format_checker()
    assert not checker.conforms("not a uri", "uri")
    assert not checker.conforms("yesterday", "date-time")
