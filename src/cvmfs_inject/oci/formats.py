"""String formats the OCI schemas assert (``uri``, ``date-time``), checked by our own code.

The official image-spec schemas say ``"format": "uri"`` for ``urls`` and ``"format":
"date-time"`` for ``created``, and upstream validates with formats asserted. jsonschema's own
checkers for these two need optional packages and, without them, silently accept anything;
these two small functions follow the RFCs the spec names instead, with no dependency.
"""

from __future__ import annotations

import calendar
import functools
import ipaddress
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jsonschema import FormatChecker

# RFC 3986 appendix A, as regular expressions over ASCII.
_PCT = "%[0-9A-Fa-f]{2}"
_UNRESERVED_SUB_DELIMS = r"A-Za-z0-9\-._~!$&'()*+,;="
_PCHAR = f"(?:[{_UNRESERVED_SUB_DELIMS}:@]|{_PCT})"
_URI = re.compile(
    "[A-Za-z][A-Za-z0-9+.-]*:"  # scheme
    "(?://"  # "//" authority path-abempty
    f"(?:(?:[{_UNRESERVED_SUB_DELIMS}:]|{_PCT})*@)?"  # userinfo
    rf"(?:\[(?P<literal>[^\]]*)\]|(?:[{_UNRESERVED_SUB_DELIMS}]|{_PCT})*)"  # host
    "(?::[0-9]*)?"  # port
    f"(?:/{_PCHAR}*)*"
    f"|(?!//)(?:{_PCHAR}|/)*)"  # or path-absolute, path-rootless, path-empty
    rf"(?:\?(?:{_PCHAR}|[/?])*)?"  # query
    f"(?:#(?:{_PCHAR}|[/?])*)?")  # fragment
_IP_FUTURE = re.compile(rf"[vV][0-9A-Fa-f]+\.[{_UNRESERVED_SUB_DELIMS}:]+")
# RFC 3339 section 5.6 date-time ("T" and "Z" may be lower case, section 5.6's note)
_DATE_TIME = re.compile(
    "([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:[.][0-9]+)?"
    "(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))")
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def is_uri(value: str) -> bool:
    """An RFC 3986 URI (section 3: scheme, then hier-part; ASCII only), as the spec's
    ``urls`` MUST be and the official schemas' ``format: uri`` asserts."""
    match = _URI.fullmatch(value)
    if match is None:
        return False
    literal = match.group("literal")
    if literal is None or _IP_FUTURE.fullmatch(literal):
        return True
    try:  # a zone identifier ("%eth0") is RFC 6874's, not RFC 3986's
        return "%" not in literal and ipaddress.IPv6Address(literal) is not None
    except ValueError:
        return False


def is_date_time(value: str) -> bool:
    """An RFC 3339 section 5.6 date-time within section 5.7's ranges: a real calendar day,
    hours to 23, minutes to 59, and second 60 only at 23:59 UTC (a leap second)."""
    match = _DATE_TIME.fullmatch(value)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    sign, offset_hour, offset_minute = match.groups()[6:]
    if not 1 <= month <= 12 or hour > 23 or minute > 59 or second > 60:
        return False
    if not 1 <= day <= (29 if month == 2 and calendar.isleap(year) else _MONTH_DAYS[month - 1]):
        return False
    offset = 0
    if sign is not None:
        if int(offset_hour) > 23 or int(offset_minute) > 59:
            return False
        offset = (int(offset_hour) * 60 + int(offset_minute)) * (1 if sign == "+" else -1)
    return second < 60 or (hour * 60 + minute - offset) % 1440 == 23 * 60 + 59


FORMATS: dict[str, Callable[[str], bool]] = {"uri": is_uri, "date-time": is_date_time}


def format_checker() -> FormatChecker:
    """A jsonschema checker for exactly these formats (imported lazily, like jsonschema is
    everywhere: a local inject checks no document)."""
    from jsonschema import FormatChecker

    checker = FormatChecker(formats=())
    for name, check in FORMATS.items():
        checker.checks(name)(functools.partial(_string_format, check))
    return checker


def _string_format(check: Callable[[str], bool], instance: object) -> bool:
    """A format applies to strings only; other types are the ``type`` keyword's business."""
    return not isinstance(instance, str) or check(instance)
