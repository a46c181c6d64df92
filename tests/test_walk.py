"""The one descriptor walk (oci.walk): order, each digest once, no recursion limit."""

from __future__ import annotations

import hashlib

import pytest

from cvmfs_inject.oci.model import Descriptor
from cvmfs_inject.oci.walk import DescriptorPath, walk

LAYER = "application/vnd.oci.image.layer.v1.tar"


def node(name: str) -> Descriptor:
    return Descriptor(LAYER, "sha256:" + hashlib.sha256(name.encode()).hexdigest(), 1)


def graph(edges: dict[str, list[str]]):
    """An expand over a graph of names; records the order it was called in."""
    calls: list[str] = []
    names = {node(n).digest: n for n in {*edges, *(c for cs in edges.values() for c in cs)}}

    def expand(path: DescriptorPath) -> list[Descriptor]:
        name = names[path.descriptor.digest]
        calls.append(name)
        return [node(child) for child in edges.get(name, [])]

    return expand, calls, names


def names_of(paths: list[DescriptorPath], names: dict[str, str]) -> list[str]:
    return [names[p.descriptor.digest] for p in paths]


def test_children_come_before_parents_and_siblings_keep_their_order() -> None:
    expand, calls, names = graph({"index": ["m1", "m2"], "m1": ["c1", "l1", "l2"],
                                  "m2": ["c2", "l1", "l3"]})
    order = walk([node("index")], expand)
    assert names_of(order, names) == ["c1", "l1", "l2", "m1", "c2", "l3", "m2", "index"]
    assert calls == ["index", "m1", "c1", "l1", "l2", "m2", "c2", "l3"]  # pre-order, once each


def test_paths_lead_from_the_root() -> None:
    expand, _, names = graph({"index": ["m1"], "m1": ["layer"]})
    (layer, manifest, index) = walk([node("index")], expand)
    assert names_of([DescriptorPath((d,)) for d in layer.descriptors], names) == [
        "index", "m1", "layer"]
    assert layer.descriptors[0] == index.descriptor and layer.parent == manifest.descriptor
    assert index.parent is None


def test_roots_and_shared_children_are_walked_once() -> None:
    expand, calls, names = graph({"a": ["shared"], "b": ["shared"]})
    order = walk([node("a"), node("b"), node("a")], expand)
    assert names_of(order, names) == ["shared", "a", "b"]
    assert calls == ["a", "shared", "b"]


def test_a_deep_graph_does_not_hit_the_recursion_limit() -> None:
    depth = 5000
    expand, _, names = graph({f"n{i}": [f"n{i + 1}"] for i in range(depth)})
    order = walk([node("n0")], expand)
    assert names_of(order, names)[0] == f"n{depth}" and len(order) == depth + 1


def test_an_error_in_expand_stops_the_walk() -> None:
    def expand(path: DescriptorPath) -> list[Descriptor]:
        raise ValueError("unreadable")

    with pytest.raises(ValueError, match="unreadable"):
        walk([node("x")], expand)
