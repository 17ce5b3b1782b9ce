"""Privacy: e-mail addresses, phone numbers, IP addresses and credential-shaped strings replaced by typed
placeholders (<EMAIL>, <PHONE>, <IP_ADDRESS>, <KEY>, <PRIVATE_KEY>), everything around them left byte for byte.

The patterns are strict on purpose (boundaries on both sides, a digit count for phones, addresses validated by
the standard library's `ipaddress`, quoted values with letters and digits after a key-like name), so prose and
code identifiers are left alone; what is still a false positive goes in the keep list (`--keep`).

Speed: every pattern starts at a literal or a small character class and its boundaries are checked in Python
after a match, so `re` skips to candidates at C speed (a leading lookbehind would run at every position and
is ~10x slower on prose).
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

KINDS = ("email", "phone", "ip", "key")
PLACEHOLDER = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "key": "<KEY>", "private_key": "<PRIVATE_KEY>"}

_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----")
# vendor token shapes: AWS access key, GitHub, GitLab, Slack, OpenAI/Stripe-style sk-, Google API, JWT
_TOKEN = re.compile(r"(?:AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}|glpat-[A-Za-z0-9_-]{20,}"
                    r"|xox[abprs]-[A-Za-z0-9-]{10,}|sk[-_](?:live_|test_|proj-)?[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{35}"
                    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})(?![A-Za-z0-9_])")
_TOKEN_AT = ("AKIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "xox", "sk-", "sk_", "AIza", "eyJ")
_ASSIGNED = re.compile(r"[:=][ \t]*[\"']([A-Za-z0-9+/_.=-]{16,})[\"']")
_KEY_NAME = re.compile(r"(?i)(?:api[_-]?key|secret(?:[_-]?key)?|token|passw(?:or)?d|access[_-]?key)[\"']?[ \t]*$")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w(\[-])")
_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}$")
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_IPV6 = re.compile(r"[0-9a-fA-F]{0,4}(?::[0-9a-fA-F]{0,4}){2,7}")
_PHONE = re.compile(r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)|\d{1,4})(?:[ .-]\d{2,8}){1,4}"
                    r"|(?:\([2-9]\d{2}\)[ .-]?|[2-9]\d{2}[ .-])\d{3}[ .-]\d{4}")


# Literal triggers (re finds a literal prefix at C speed); the full patterns run only in windows around them.
_IPV4_AT = re.compile(r"\.\d")
_IPV6_AT = re.compile(r"::|:[0-9a-fA-F]{1,4}:[0-9a-fA-F]{1,4}:")
_PHONE_AT = re.compile(r"0000|\+0")  # in the text with every digit turned into 0
_ZERO = str.maketrans("123456789", "000000000")


def _windows(text: str, trigger: re.Pattern, before: int, after: int):
    """Merged (start, end) ranges around the trigger's matches."""
    start = end = -1
    for m in trigger.finditer(text):
        s, e = max(0, m.start() - before), min(len(text), m.end() + after)
        if s > end:
            if end > start:
                yield start, end
            start = s
        end = max(end, e)
    if end > start:
        yield start, end


def _digits(text: str) -> int:
    return sum(map(text.count, "0123456789"))


class Span(NamedTuple):
    start: int  # in the original text
    end: int
    kind: str  # email, phone, ip, key, private_key
    original: str


def _before(text: str, i: int, chars: str) -> bool:
    """True if the character before position i is a word character or one of `chars`."""
    return i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_" or text[i - 1] in chars)


def _emails(text: str):
    at = text.find("@")
    while at != -1:
        local = _LOCAL.search(text, max(0, at - 64), at)
        dom = _DOMAIN.match(text, at + 1)
        if local and dom and not _before(text, local.start(), ".+-"):
            yield local.start(), dom.end()
        at = text.find("@", at + 1)


def _keys(text: str):
    if "PRIVATE KEY" in text:
        for m in _PRIVATE_KEY.finditer(text):
            yield m.start(), m.end(), "private_key"
    if any(t in text for t in _TOKEN_AT):
        for m in _TOKEN.finditer(text):
            if not _before(text, m.start(), ""):
                yield m.start(), m.end(), "key"
    for m in _ASSIGNED.finditer(text):
        v = m.group(1)
        if (_KEY_NAME.search(text, max(0, m.start() - 40), m.start()) and any(c.isdigit() for c in v)
                and any(c.isalpha() for c in v)):
            yield m.start(1), m.end(1), "key"


def _ips(text: str):
    for ws, we in _windows(text, _IPV4_AT, 3, 13):
        yield from _ipv4(text, ws, we)
    for ws, we in _windows(text, _IPV6_AT, 40, 40):
        yield from _ipv6(text, ws, we)


def _ipv4(text: str, ws: int, we: int):
    for m in _IPV4.finditer(text, ws, we):
        s, e = m.span()
        if _before(text, s, ".:") or (e < len(text) and (text[e].isalnum() or text[e] == "_"
                                                         or (text[e] == "." and text[e + 1:e + 2].isdigit()))):
            continue
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield s, e


def _ipv6(text: str, ws: int, we: int):
    for m in _IPV6.finditer(text, ws, we):
        s, e, g = m.start(), m.end(), m.group()
        groups = [x for x in g.split(":") if x]
        # full form, or compressed with a leading group of 3-4 digits (fe80::1, 2001:db8::1), not a[1::2]
        if not (len(groups) == 8 or ("::" in g and len(groups) >= 2 and len(g.split(":")[0]) >= 3)):
            continue
        if _before(text, s, ":.") or (e < len(text) and (text[e].isalnum() or text[e] in "_:")):
            continue
        try:
            ipaddress.IPv6Address(g)
        except ValueError:
            continue
        yield s, e


def _phones(text: str):
    if _digits(text) < 7:
        return
    for ws, we in _windows(text.translate(_ZERO), _PHONE_AT, 24, 24):
        yield from _phone(text, ws, we)


def _phone(text: str, ws: int, we: int):
    for m in _PHONE.finditer(text, ws, we):
        s, e = m.span()
        if _before(text, s, ".+-") or (e < len(text) and (text[e].isalnum() or text[e] in "_-"
                                                          or (text[e] == "." and text[e + 1:e + 2].isdigit()))):
            continue
        if 7 <= sum(c.isdigit() for c in m.group()) <= 15:
            yield s, e


def find_pii(text: str, kinds: tuple[str, ...] = KINDS, keep: frozenset[str] | tuple[str, ...] = ()) -> list[Span]:
    """The spans of `text` to redact, in order and never overlapping (an earlier start wins; at the same start,
    keys, then e-mail, then IP, then phone)."""
    found = []
    if "key" in kinds:
        found += [(s, 0, e, k) for s, e, k in _keys(text)]
    if "email" in kinds:
        found += [(s, 1, e, "email") for s, e in _emails(text)]
    if "ip" in kinds:
        found += [(s, 2, e, "ip") for s, e in _ips(text)]
    if "phone" in kinds:
        found += [(s, 3, e, "phone") for s, e in _phones(text)]
    out, end = [], 0
    for s, _, e, kind in sorted(found):
        if s >= end and text[s:e] not in keep:
            out.append(Span(s, e, kind, text[s:e]))
            end = e
    return out


def redact(text: str, kinds: tuple[str, ...] = KINDS, keep: frozenset[str] | tuple[str, ...] = ()) -> tuple[str, list[Span]]:
    """`text` with each PII span replaced by its placeholder, and the spans (original offsets)."""
    spans = find_pii(text, kinds, frozenset(keep))
    if not spans:
        return text, spans
    parts, pos = [], 0
    for s in spans:
        parts += [text[pos:s.start], PLACEHOLDER[s.kind]]
        pos = s.end
    parts.append(text[pos:])
    return "".join(parts), spans


def count_kinds(spans: list[Span]) -> dict[str, int]:
    """Redactions per reported type (a private-key block counts as key)."""
    out: dict[str, int] = {}
    for s in spans:
        k = "key" if s.kind == "private_key" else s.kind
        out[k] = out.get(k, 0) + 1
    return out
