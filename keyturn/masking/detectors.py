"""Content detectors: the backstop that catches sensitive values lineage did not.

On a masked connection every text value going to the client (and the message/detail of
errors and notices) is scanned. The cost is paid per value on the relay hot path, so:

- All detectors are compiled into ONE regular expression, an alternation of named groups,
  searched once per value. There is no loop over detectors per value.
- Checks a regex cannot express (Luhn for cards, mod-97 for IBANs, the header of a JWT,
  digit counts for phones) run only on candidate matches.
- Every built-in match starts at one of a few characters: a digit, ``@ : = + ( - _`` or
  ``A``/``J`` (of ``AKIA``, ``eyJ``). The combined pattern begins with that character class,
  so the regex engine skips ordinary text in its tight search loop and tries detectors only
  at those characters; prefixes before the anchor are checked by lookbehind. This is the
  pre-filter for text values (a separate pass before the regex measured slower). For UTF-8
  wire values, ``redact_bytes`` looks for the same characters in the raw bytes and returns
  values without any untouched, without decoding them. Custom detectors can match
  anything, so a set with custom detectors tries them at every position and skips no value.

Built-in detectors (names usable in ``DetectorSet.build(enabled=...)``; ``secrets`` is
shorthand for ``api_key``, ``jwt`` and ``private_key``):

``email``       local@domain.tld, any letter case.
``ssn``         US SSN ``AAA-GG-SSSS`` (dashes or single spaces), area not 000/666/9xx,
                group not 00, serial not 0000. Nine bare digits are an SSN only right after
                a label (``SSN``, ``SSN#``, ``social security number``): on their own they
                are indistinguishable from ZIP+4 codes, order numbers and ids.
``card``        13-19 digits, optionally grouped by single spaces or dashes (groups of 1-6
                digits), in an issuer range with that range's length (Visa 4: 13/16/19,
                Mastercard 51-55/2221-2720: 16, Amex 34/37: 15, Diners, JCB, Discover,
                UnionPay, Maestro), passing the Luhn check, not glued to letters or digits.
                When a longer run fails, shorter runs ending at a group separator are
                tried (``4111 1111 1111 1111 2031`` still hits).
``iban``        country code + 2 check digits + BBAN, spaces allowed, length as registered
                for the country and not glued to further letters or digits, mod-97 == 1.
``phone``       ``+`` followed by 8-15 digits (E.164, separators allowed); North American
                ``(AAA) EEE-NNNN`` / ``AAA-EEE-NNNN`` / ``AAA.EEE.NNNN`` with separators;
                national trunk formats such as ``020 7946 0958`` and ``06 12 34 56 78``.
                Bare digit runs are never phones: they are usually ids, amounts or years.
``api_key``     Stripe ``sk_/rk_live_/test_``, AWS ``AKIA``/``ASIA`` access key ids,
                GitHub ``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_``/``github_pat_``, Slack
                ``xoxb-``/``xoxp-``/``xoxa-``/``xoxr-``/``xoxs-``, and generic assignments
                ``api_key=…``, ``secret_key: …``, ``password=…`` (only the value is redacted).
``jwt``         three base64url segments whose first decodes to a JSON object (``eyJ…``).
``private_key`` PEM ``-----BEGIN … PRIVATE KEY-----`` blocks through their END line, or to
                the end of the value when the END line is missing (a truncated key is still
                a key).

Detectors see values in their usual written forms. A user who can write SQL can encode a
value (reverse it, interleave characters) so no pattern sees it; that is why lineage-based
masking comes first and detectors are the backstop.

It must not decide which columns are sensitive: lineage and policy do.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

# A validator receives the candidate text and returns the (start, end) of the real hit
# inside it, or None to reject the candidate.
Validator = Callable[[str], "tuple[int, int] | None"]

REDACTED = "<redacted:{}>"


@dataclass(frozen=True, slots=True)
class Hit:
    """One detected value: ``text[start:end]`` matched detector ``name``."""

    name: str
    start: int
    end: int


# Finds where a hit really starts when its match begins at a later, rarer character (an
# email at its "@", a Stripe key at its "_"): (text, match start, scan position) -> start,
# or None to reject the candidate.
Back = Callable[[str, int, int], "int | None"]


@dataclass(frozen=True)
class _Detector:
    name: str
    # ``first`` is a character class for the first character of every match ("" for custom
    # detectors: anything). ``rest`` matches what follows and may contain (?P<v>...)
    # marking the part that is the sensitive value.
    first: str
    rest: str
    validator: Validator | None = None
    back: Back | None = None
    # Checked once for a group of detectors sharing it, right after the first character.
    gate: str = ""


# ---------------------------------------------------------------- validators


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


_GROUP_SEP = re.compile(r"[ -]")


def _issuer_length_ok(digits: str) -> bool:
    # Issuer ranges and their card lengths: random 13-19 digit numbers mostly fail here
    # before Luhn is even asked (ids, timestamps, account numbers).
    n = len(digits)
    p2, p4 = int(digits[:2]), int(digits[:4])
    if digits[0] == "4":  # Visa
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:  # Mastercard
        return n == 16
    if p2 in (34, 37):  # American Express
        return n == 15
    if p2 in (30, 36, 38, 39):  # Diners Club
        return 14 <= n <= 19
    if p2 == 35:  # JCB
        return 16 <= n <= 19
    if p2 == 50 or 56 <= p2 <= 69:  # Maestro, Discover, UnionPay, RuPay, ...
        return 13 <= n <= 19
    return False


def _card(candidate: str) -> tuple[int, int] | None:
    # The regex took the longest run; try it, then shorter runs cut at a separator, so a
    # card followed by another group of digits (an expiry year, a CVC) is still found.
    ends = [len(candidate)] + [m.start() for m in _GROUP_SEP.finditer(candidate)][::-1]
    for end in ends:
        groups = _GROUP_SEP.split(candidate[:end])
        if len(groups) > 1 and not all(len(g) <= 6 for g in groups):
            # Cards are printed in groups of 4 (Amex 4-6-5); 8-4-4-4-12 is a UUID.
            continue
        digits = "".join(groups)
        if 13 <= len(digits) <= 19 and _issuer_length_ok(digits) and _luhn_ok(digits):
            return 0, end
    return None


# ISO 13616 registry lengths (country code -> total IBAN length).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27,
    "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def _iban_ok(compact: str) -> bool:
    rearranged = compact[4:] + compact[:4]
    # int(c, 36) maps 0-9 to 0-9 and A-Z to 10-35, exactly the IBAN letter numbering.
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _iban(candidate: str) -> tuple[int, int] | None:
    expected = IBAN_LENGTHS.get(candidate[:2].upper())
    if expected is None:
        return None
    # Cut the candidate at the registered length (the regex may have run on into
    # following words) and map that cut back to a position in the original text.
    count = 0
    for pos, ch in enumerate(candidate):
        if ch != " ":
            count += 1
            if count == expected:
                if pos + 1 < len(candidate) and candidate[pos + 1] != " ":
                    # Glued to more letters or digits: part of a longer token (a hex
                    # digest, a reference), not an IBAN.
                    return None
                compact = candidate[: pos + 1].replace(" ", "").upper()
                return (0, pos + 1) if _iban_ok(compact) else None
    return None


def _phone(candidate: str) -> tuple[int, int] | None:
    n = sum(ch.isdigit() for ch in candidate)
    if candidate.startswith("+"):
        return (0, len(candidate)) if 8 <= n <= 15 else None
    return (0, len(candidate)) if 10 <= n <= 11 else None


def _jwt(candidate: str) -> tuple[int, int] | None:
    header = candidate.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError):
        return None
    return (0, len(candidate)) if isinstance(decoded, dict) else None


# ---------------------------------------------------------------- built-in patterns

_LOCAL_PART = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")


def _email_start(text: str, at: int, floor: int) -> int | None:
    # The match begins at "@"; the local part is everything before it that may belong to
    # one (walked back in Python, only for the rare "@", instead of making the regex try
    # every word as a possible local part).
    start = at
    while start > floor and text[start - 1] in _LOCAL_PART:
        start -= 1
    return start if start < at else None


_KEYWORD_AT_END = re.compile(
    r"(?<![A-Za-z0-9])(?i:(?:api|access|secret|auth|client|private)[_-]?(?:key|token|secret)"
    r"|passw(?:or)?d)\Z"
)
_IDENT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _keyword_start(text: str, at: int, floor: int) -> int | None:
    # Runs at every ":" and "=" followed by a long value (URLs, log fields), so it reads
    # the name before the anchor by hand and lets a regex see only that name.
    j = at
    while j > 0 and text[j - 1] in " \t":
        j -= 1
    if j > 0 and text[j - 1] in "\"'":
        j -= 1
    if j == 0 or text[j - 1] not in "yYnNtTdD":  # key, token, secret, passwd, password
        return None
    i = j
    while i > 0 and j - i < 64 and text[i - 1] in _IDENT:
        i -= 1
    return at if _KEYWORD_AT_END.search(text, i, j) else None


_SSN_LABEL_BEFORE = re.compile(
    r"(?<![A-Za-z0-9])(?i:ssn|social[ \t]+security(?:[ \t]+(?:number|no\.?))?)"
    r"[ \t]*[#:=]?[ \t]*$"
)


def _after(label: re.Pattern[str], reach: int) -> Back:
    def check(text: str, at: int, floor: int) -> int | None:
        return at if label.search(text, max(0, at - reach), at) else None

    return check


def _shift(n: int) -> Back:
    def start(text: str, at: int, floor: int) -> int:
        return max(at - n, floor)

    return start


# Every built-in match starts at one of a few rare characters (digits, "@", ":", "=",
# "+", "(", "-", "_", "A", "J"). The combined pattern begins with that character class,
# which lets the regex engine skip ordinary text in a tight loop instead of trying every
# detector at every position; prefixes before the anchor ("sk" of "sk_live_", the letters
# of an IBAN, an email's local part) are checked by lookbehind and added back by ``back``.
# A lookbehind of the form (?<![A-Za-z0-9].) means "the match starts a token".
# Digits, "+" and "(" that start a token: SSN, card, phone. Inside a word or a number
# all of them are refused by this one check.
_TOKEN_DIGIT = r"(?<=[0-9+(])(?<![A-Za-z0-9].)"

_BUILTINS: tuple[_Detector, ...] = (
    _Detector(
        "private_key",
        "-",
        r"----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
        r"(?s:.*?-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----|.*)",
    ),
    _Detector(
        "jwt",
        "J",
        r"(?<=eyJ)(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"
        r"(?![A-Za-z0-9_-])",
        _jwt,
        _shift(2),
    ),
    _Detector("api_key", "A", r"(?<![A-Za-z0-9]A)(?:KIA|SIA)[A-Z0-9]{16}(?![A-Za-z0-9_])"),
    _Detector(
        "api_key",
        "_",
        r"(?<=[sr]k_)(?<![A-Za-z0-9][sr]k_)(?:live|test)_[A-Za-z0-9]{10,247}(?![A-Za-z0-9_])",
        back=_shift(2),
    ),
    _Detector(
        "api_key",
        "_",
        r"(?<=gh[pousr]_)(?<![A-Za-z0-9]gh[pousr]_)[A-Za-z0-9]{36,251}(?![A-Za-z0-9_])",
        back=_shift(3),
    ),
    _Detector(
        "api_key",
        "_",
        r"(?<=github_)(?<![A-Za-z0-9]github_)pat_[A-Za-z0-9_]{22,251}(?![A-Za-z0-9_])",
        back=_shift(6),
    ),
    _Detector(
        "api_key",
        "-",
        r"(?<=xox[abprs]-)(?<![A-Za-z0-9]xox[abprs]-)[A-Za-z0-9-]{10,250}(?![A-Za-z0-9_])",
        back=_shift(4),
    ),
    # Anchored at the first check digit, after two letters that start a token.
    _Detector(
        "iban",
        "0-9",
        r"(?<![A-Za-z0-9][A-Za-z]{2}[0-9])[0-9](?: ?[A-Za-z0-9]){11,30}",
        _iban,
        _shift(2),
        r"(?<=[A-Za-z]{2}[0-9])",
    ),
    _Detector(
        "ssn",
        "0-8",
        r"(?<![A-Za-z0-9-].)[0-9]{2}(?<!000)(?<!666)(?P<s>[- ])(?!00)[0-9]{2}(?P=s)"
        r"(?!0000)[0-9]{4}(?![0-9]|-[0-9])",
        gate=_TOKEN_DIGIT,
    ),
    # Nine bare digits only right after an SSN label.
    _Detector(
        "ssn",
        "0-8",
        r"(?<![A-Za-z0-9].)[0-9]{2}(?<!000)(?<!666)(?!00)[0-9]{2}(?!0000)[0-9]{4}(?![0-9])",
        back=_after(_SSN_LABEL_BEFORE, 40),
        gate=_TOKEN_DIGIT,
    ),
    _Detector(
        "card",
        "2-6",
        r"(?<![A-Za-z0-9-].)[0-9](?:[ -]?[0-9]){11,17}(?![A-Za-z0-9])",
        _card,
        gate=_TOKEN_DIGIT,
    ),
    _Detector(
        "phone",
        "0-9+(",
        # One digit per repetition keeps the match deterministic (no backtracking blow-up
        # on long digit runs); the validator counts digits.
        r"(?<=\+)(?<![A-Za-z0-9+].)[1-9](?:[ .-]?\(?[0-9]\)?){7,14}(?![0-9])"
        r"|(?<=\()(?<![A-Za-z0-9(-].)[2-9][0-9]{2}\)[ ]?[2-9][0-9]{2}[-. ][0-9]{4}(?![0-9])"
        r"|(?<=[2-9])(?<![A-Za-z0-9.-].)[0-9]{2}(?P<n>[-.])[2-9][0-9]{2}(?P=n)[0-9]{4}"
        r"(?![0-9]|[-.][0-9])"
        r"|(?<=0)(?<![A-Za-z0-9.-].)[1-9](?:[ .-][0-9]{2}){4}(?![0-9]|[ .-][0-9])"
        r"|(?<=0)(?<![A-Za-z0-9.-].)[1-9][0-9]{1,3}[ -][0-9]{3,4}[ -]?[0-9]{3,4}"
        r"(?![0-9]|[ -][0-9])",
        _phone,
        gate=_TOKEN_DIGIT,
    ),
    _Detector(
        "email",
        "@",
        r"(?<=[A-Za-z0-9._%+-]@)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+[A-Za-z]{2,63}"
        r"(?![A-Za-z0-9-])",
        back=_email_start,
    ),
    # Generic assignments (api_key=..., "password": "..."): only the value is redacted.
    _Detector(
        "api_key",
        ":=",
        r"[ \t]*[\"']?(?P<v>[^\s\"',;&<>]{8,})",
        back=_keyword_start,
    ),
)

BUILTIN_NAMES: tuple[str, ...] = tuple(dict.fromkeys(d.name for d in _BUILTINS))
ALIASES: dict[str, tuple[str, ...]] = {"secrets": ("api_key", "jwt", "private_key")}

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")
_LEADING_FLAGS = re.compile(r"\(\?([aiLmsux]+)\)")
_EMPTY_PROBES = ("", "a", "0", " ", "a b", "x-1.", "\n")
_BACKREF = re.compile(r"\\[1-9]|\(\?P=|\(\?P<|\(\?<(?![=!])")


class DetectorConfigError(ValueError):
    """A detector name or custom pattern in config cannot be used."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"detector {name!r}: {reason}")
        self.name = name
        self.reason = reason


def _custom_detector(name: str, pattern: str) -> _Detector:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DetectorConfigError(
            str(name), "names start with a letter and use letters, digits, _ . - only"
        )
    if name in BUILTIN_NAMES or name in ALIASES:
        raise DetectorConfigError(name, "is a built-in detector; choose another name")
    if not isinstance(pattern, str) or not pattern:
        raise DetectorConfigError(name, "the pattern must be a non-empty string")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise DetectorConfigError(name, f"invalid regular expression {pattern!r}: {exc}") from exc
    if _BACKREF.search(pattern):
        # Group numbers and names change once patterns are combined into one.
        raise DetectorConfigError(
            name, "named groups and backreferences are not supported; use (?:...) groups"
        )
    # A pattern that can match nothing (x*, \b) would "hit" everywhere and redact nothing.
    for probe in _EMPTY_PROBES:
        if any(m.end() == m.start() for m in compiled.finditer(probe)):
            raise DetectorConfigError(name, f"pattern {pattern!r} matches the empty string")
    # A leading (?i) is global in Python and must come first in the whole pattern;
    # scope it to this detector instead.
    flags = _LEADING_FLAGS.match(pattern)
    if flags:
        # In verbose mode a trailing comment would swallow the closing parenthesis.
        tail = "\n" if "x" in flags.group(1) else ""
        pattern = f"(?{flags.group(1)}:{pattern[flags.end():]}{tail})"
    try:
        re.compile(f"(?:{pattern})")
    except re.error as exc:
        raise DetectorConfigError(name, f"cannot combine pattern {pattern!r}: {exc}") from exc
    return _Detector(name, "", pattern)


@dataclass(frozen=True)
class _Compiled:
    name: str
    group: str
    value_group: str | None
    validator: Validator | None
    back: Back | None
    alone: re.Pattern[str]  # this detector only, for the rare retry after a rejected match


class DetectorSet:
    """A fixed set of detectors compiled into one pattern; build once, scan many values."""

    def __init__(self, detectors: Iterable[_Detector], prefilter: bool = True) -> None:
        gates: dict[str, list[str]] = {}
        anchors: set[str] = set()
        custom: list[str] = []
        compiled: list[_Compiled] = []
        # Built-ins first: their order is the priority among matches at one position.
        ordered = sorted(detectors, key=lambda d: not d.first)
        for i, det in enumerate(ordered):
            group = f"d{i}"
            value_group = f"d{i}v" if "(?P<v>" in det.rest else None
            src = det.rest
            # Inner group names must be unique in the combined pattern.
            for inner in ("v", "s", "n"):
                src = src.replace(f"(?P<{inner}>", f"(?P<d{i}{inner}>")
                src = src.replace(f"(?P={inner})", f"(?P=d{i}{inner})")
            if det.first:
                first = f"[{re.escape(det.first) if det.first in ('-', ':=') else det.first}]"
                anchors.add(first[1:-1])
                gate = det.gate or f"(?<={first})"
                gates.setdefault(gate, []).append(f"(?<={first})(?P<{group}>{src})")
                alone = re.compile(f"{first}{gate}(?P<{group}>{src})")
            else:
                custom.append(f"(?P<{group}>{src})")
                alone = re.compile(custom[-1])
            compiled.append(
                _Compiled(det.name, group, value_group, det.validator, det.back, alone)
            )
        # Alternatives are grouped under their gate. No two gates hold at one position (a
        # different first character, or a letter vs. a non-letter before a digit), so the
        # grouping keeps every priority while most positions fail after one check.
        grouped = [f"{gate}(?:{'|'.join(alts)})" for gate, alts in gates.items()]
        # No built-in starts at a digit right after a digit: refuse those before any gate.
        parts = (
            [f"[{''.join(sorted(anchors))}](?<![0-9][0-9])(?:{'|'.join(grouped)})"]
            if grouped
            else []
        )
        self._detectors = tuple(compiled)
        self._by_group = {c.group: (i, c) for i, c in enumerate(compiled)}
        self._pattern: re.Pattern[str] | None = (
            re.compile("|".join(parts + custom)) if parts or custom else None
        )
        # Custom detectors can match anything, so no pre-filter can speak for them.
        self._prefilter_bytes: re.Pattern[bytes] | None = (
            re.compile(f"[{''.join(sorted(anchors))}]".encode())
            if prefilter and anchors and not custom
            else None
        )
        self.names: tuple[str, ...] = tuple(dict.fromkeys(c.name for c in compiled))

    @classmethod
    def build(
        cls,
        enabled: Iterable[str] | None = None,
        custom: Mapping[str, str] | None = None,
        *,
        prefilter: bool = True,
    ) -> DetectorSet:
        """Compile the built-ins named in ``enabled`` (None = all) plus ``custom`` regexes.

        Raises DetectorConfigError (a ValueError) naming the detector for an unknown name,
        a pattern that does not compile, or one that matches the empty string.
        ``prefilter=False`` makes ``redact_bytes`` decode and scan every value (for
        measuring what the pre-filter saves and checking that it never changes a result).
        """
        if enabled is None:
            wanted = set(BUILTIN_NAMES)
        else:
            if isinstance(enabled, str):
                enabled = [enabled]
            wanted = set()
            for name in enabled:
                if name in ALIASES:
                    wanted.update(ALIASES[name])
                elif name in BUILTIN_NAMES:
                    wanted.add(name)
                else:
                    known = ", ".join((*BUILTIN_NAMES, *ALIASES))
                    raise DetectorConfigError(
                        str(name), f"unknown built-in detector (known: {known})"
                    )
        # Built-ins keep their fixed priority order (most specific first), whatever
        # order config lists them in.
        detectors = [d for d in _BUILTINS if d.name in wanted]
        customs = [_custom_detector(n, p) for n, p in (custom or {}).items()]
        return cls([*detectors, *customs], prefilter)

    # ------------------------------------------------------------ scanning

    def scan(self, text: str) -> list[Hit]:
        """All detected values in ``text``, left to right, never overlapping."""
        pattern = self._pattern
        if pattern is None:
            return []
        hits: list[Hit] = []
        pos = 0
        end_of_text = len(text)
        while pos <= end_of_text:
            m = pattern.search(text, pos)
            if m is None:
                break
            index, det = self._by_group[m.lastgroup]  # type: ignore[index]
            hit = self._accept(det, m, pos)
            if hit is None:
                hit = self._retry(index, text, m.start(), pos)
            if hit is None or hit.end <= hit.start:
                # Rejected candidate (or an empty custom match): look again one further on.
                pos = m.start() + 1
                continue
            hits.append(hit)
            pos = hit.end
        return hits

    @staticmethod
    def _accept(det: _Compiled, m: re.Match[str], floor: int) -> Hit | None:
        # Every match starts at its anchor character (or where a custom pattern began).
        start, end = m.start(), m.end(det.group)
        if det.back is not None:
            moved = det.back(m.string, start, floor)
            if moved is None:
                return None
            start = moved
        if det.value_group is not None and m.group(det.value_group):
            start, end = m.span(det.value_group)
        if det.validator is None:
            return Hit(det.name, start, end)
        span = det.validator(m.string[start:end])
        if span is None:
            return None
        return Hit(det.name, start + span[0], start + span[1])

    def _retry(self, index: int, text: str, at: int, floor: int) -> Hit | None:
        # The first detector to match here was rejected by its validator; a later detector
        # may still match at the same place (a Luhn-failing digit run can be a phone).
        for det in self._detectors[index + 1 :]:
            m = det.alone.match(text, at)
            if m is not None:
                hit = self._accept(det, m, floor)
                if hit is not None:
                    return hit
        return None

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """Replace each hit with ``<redacted:NAME>``; also count hits per detector."""
        hits = self.scan(text)
        if not hits:
            return text, {}
        out: list[str] = []
        counts: dict[str, int] = {}
        last = 0
        for hit in hits:
            out.append(text[last : hit.start])
            out.append(REDACTED.format(hit.name))
            counts[hit.name] = counts.get(hit.name, 0) + 1
            last = hit.end
        out.append(text[last:])
        return "".join(out), counts

    def redact_bytes(self, value: bytes) -> tuple[bytes, dict[str, int]]:
        """``redact`` for a UTF-8 wire value.

        Returns ``value`` itself (same object) when nothing matched, so callers can skip
        copying. Bytes that are not valid UTF-8 are scanned as far as they are readable and
        kept byte-for-byte otherwise.
        """
        if self._pattern is None:
            return value, {}
        if self._prefilter_bytes is not None and self._prefilter_bytes.search(value) is None:
            return value, {}
        text = bytes(value).decode("utf-8", "surrogateescape")
        redacted, counts = self.redact(text)
        if not counts:
            return value, {}
        return redacted.encode("utf-8", "surrogateescape"), counts

    def __repr__(self) -> str:
        return f"DetectorSet({', '.join(self.names)})"
