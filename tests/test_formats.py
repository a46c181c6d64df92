"""Tests for cvmfs_inject.oci.formats: RFC 3986 URIs and RFC 3339 date-times, case by case.

Cases come from the RFCs' grammars and examples (RFC 3986 section 1.1.2, RFC 3339 section 5.8)
and from the edges where loose checkers differ: Python's ``$`` before a final newline, IPv4
octets with leading zeros, zone identifiers, leap seconds, lower-case "t" and "z".
"""

from __future__ import annotations

import pytest

from cvmfs_inject.oci.formats import format_checker, is_date_time, is_uri

URIS = [
    ("ftp://ftp.is.co.za/rfc/rfc1808.txt", True),
    ("http://www.ietf.org/rfc/rfc2396.txt", True),
    ("ldap://[2001:db8::7]/c=GB?objectClass?one", True),
    ("mailto:John.Doe@example.com", True),
    ("news:comp.infosystems.www.servers.unix", True),
    ("tel:+1-816-555-1212", True),
    ("telnet://192.0.2.16:80/", True),
    ("urn:oasis:names:specification:docbook:dtd:xml:4.1.2", True),
    ("https://registry.example.org:5000/v2/a/b/blobs/sha256:0?x=1&y=%2F#top", True),
    ("http://user:p%40ss@example.com/", True),
    ("http://[::ffff:192.0.2.1]/", True),
    ("http://[v7.fe80::a+en1]/", True),
    ("file:///srv/blob", True),
    ("http:", True),
    ("HTTP://EXAMPLE.COM/", True),
    ("x:~!$&'()*+,;=:@/?", True),
    ("", False),
    ("/v2/a/blobs/x", False),  # a relative reference, not a URI
    ("example.com/blob", False),
    ("1http://example.com/", False),  # a scheme starts with a letter
    ("https://example.com/a b", False),
    ("https://example.com/blöb", False),  # an IRI
    ("https://example.com/%zz", False),
    ("https://example.com/%4", False),
    ("https://example.com/{x}", False),
    ("https://example.com/a\\b", False),
    ("https://example.com/\n", False),
    ("\nhttps://example.com/", False),
    ("http://[::1::2]/", False),
    ("http://[::1.2.3.04]/", False),  # dec-octet has no leading zero
    ("http://[fe80::1%eth0]/", False),  # a zone identifier is RFC 6874's
    ("http://[1.2.3.4]/", False),  # IPv4 is not an IP-literal
    ("http://exa mple.com/", False),
    ("http://a@b@c/", False),
    ("http://host:port/", False),
    ("http://a/b#c#d", False),
]


@pytest.mark.parametrize(("value", "expected"), URIS, ids=[repr(u) for u, _ in URIS])
def test_is_uri(value: str, expected: bool) -> None:
    assert is_uri(value) is expected


DATE_TIMES = [
    ("1985-04-12T23:20:50.52Z", True),
    ("1996-12-19T16:39:57-08:00", True),
    ("1990-12-31T23:59:60Z", True),
    ("1990-12-31T15:59:60-08:00", True),
    ("1937-01-01T12:00:27.87+00:20", True),
    ("2015-10-31t22:22:56z", True),
    ("2024-02-29T00:00:00Z", True),
    ("2000-02-29T00:00:00Z", True),
    ("0001-01-01T00:00:00Z", True),
    ("2015-10-31T22:22:56.123456789012Z", True),
    ("2015-10-31T22:22:56+23:59", True),
    ("1900-02-29T00:00:00Z", False),
    ("2015-02-29T00:00:00Z", False),
    ("2015-04-31T00:00:00Z", False),
    ("2015-00-10T00:00:00Z", False),
    ("2015-10-00T00:00:00Z", False),
    ("2015-13-01T00:00:00Z", False),
    ("2015-10-31T24:00:00Z", False),
    ("2015-10-31T22:60:00Z", False),
    ("2015-10-31T22:22:61Z", False),
    ("1990-12-31T22:59:60Z", False),  # a leap second only at 23:59 UTC
    ("1990-12-31T23:58:60Z", False),
    ("1990-12-31T23:59:60+01:00", False),
    ("2015-10-31T22:22:56+24:00", False),
    ("2015-10-31T22:22:56+01:60", False),
    ("2015-10-31T22:22:56", False),
    ("2015-10-31 22:22:56Z", False),
    ("2015-10-31", False),
    ("22:22:56Z", False),
    ("2015-10-31T22:22:56.Z", False),
    ("2015-10-31T22:22:56Z\n", False),
    ("\uff12015-10-31T22:22:56Z", False),  # a full-width digit
    ("yesterday", False),
]


@pytest.mark.parametrize(("value", "expected"), DATE_TIMES, ids=[v for v, _ in DATE_TIMES])
def test_is_date_time(value: str, expected: bool) -> None:
    assert is_date_time(value) is expected


def test_format_checker_asserts_strings_only() -> None:
    """The checker knows exactly our formats; a non-string is the type keyword's business."""
    checker = format_checker()
    assert sorted(checker.checkers) == ["date-time", "uri"]
    assert checker.conforms("https://example.com/", "uri")
    assert not checker.conforms("example.com", "uri")
    assert not checker.conforms("2015-02-30T00:00:00Z", "date-time")
    assert checker.conforms(42, "uri") and checker.conforms(None, "date-time")
