"""Policy evaluation: ``evaluate(request) -> Decision``.

Rules are data from the config file. For each statement the rules of the
connection's policy are tried top to bottom and the **first rule that matches
decides** that statement. A message with several statements gets the most
severe of its statements' decisions (block > review > allow); among equally
severe ones the first statement's rule is reported. No matching rule means the
policy's ``default`` action (``block`` unless configured), so anything
unforeseen fails closed.

Table and function matching leans to the safe side: a ``block`` or ``review``
rule matches when *any* table (function) of the statement matches one of its
globs; an ``allow`` rule only when *every* one does. A statement that changes
who you are or how SQL is read (``SET ROLE``...) is blocked before any rule.

Every Decision carries the rule and a reason, which travel into the audit
trail, the ticket, the client's error and ``keyturn policy explain``.
This module must stay pure: no I/O, no store, no protocol code.

It must not do I/O or know a protocol beyond its vocabulary.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from keyturn.config import Config, MaskSettings, Policy, ReviewSettings, Rule
from keyturn.request import Action, Request, Vocabulary

log = logging.getLogger(__name__)

SEVERITY = {"allow": 0, "mask": 0, "review": 1, "block": 2}
PERMITTING = frozenset({"allow", "mask"})
BUILTIN_IDENTITY_RULE = "builtin:session-identity"
BUILTIN_UNPARSED_RULE = "builtin:unparsed"


# A statement is one action of a request (keyturn.request); the names stay for the callers.
StatementLike = Action


@dataclass(frozen=True)
class StatementDecision:
    text: str
    classification: str
    action: str
    rule: str | None
    reason: str
    tables: tuple[str, ...]
    functions: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "class": self.classification, "action": self.action,
                "rule": self.rule, "reason": self.reason, "tables": list(self.tables),
                "functions": list(self.functions)}


@dataclass(frozen=True)
class Decision:
    action: str
    rule: str | None
    reason: str
    classification: str
    review: ReviewSettings | None
    statements: tuple[StatementDecision, ...]
    # Masking of the results: (rule, settings) of every deciding rule that masks.
    masks: tuple[tuple[str, MaskSettings], ...] = ()
    # The request runs code the gateway cannot see into (a user-defined function, whatever
    # class the policy gives such code): it may change session state the target does not
    # report (the protocol gateway decides what follows from that).
    opaque_code: bool = False

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for s in self.statements for t in s.tables))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "action": self.action, "rule": self.rule, "reason": self.reason,
            "class": self.classification,
            "statements": [s.to_json() for s in self.statements],
        }
        if self.review:
            out["review"] = {"approvers": list(self.review.approvers),
                             "min_approvals": self.review.min_approvals,
                             "timeout_seconds": self.review.timeout, "mode": self.review.mode}
            if self.review.escalate_to:
                out["review"]["escalate"] = {
                    "to": list(self.review.escalate_to),
                    "after": f"{self.review.escalate_after:.0%}"
                    if self.review.escalate_after_fraction
                    else f"{self.review.escalate_after:g}s"}
        if self.masks:
            out["mask"] = [{"rule": name, "columns": list(m.columns), "tags": list(m.tags),
                            "style": m.style} for name, m in self.masks]
        return out


def _cls_name(cls: Any) -> str:
    return str(getattr(cls, "value", cls))


@functools.lru_cache(maxsize=4096)
def _pattern(vocab: Vocabulary, kind: str, glob: str) -> str:
    return vocab.normalize(kind, glob)


#: A resource name meaning "any resource of its kind" (statistics views for tables).
ANY_RESOURCE = "*"
_EVERYTHING = frozenset({"*", "*.*", "*.*.*"})
_GLOB_CHARS = frozenset("*?[")


def _names_match(names: Iterable[str], globs: tuple[str, ...], *, every: bool,
                 vocab: Vocabulary, kind: str) -> bool:
    names = list(names)
    if not names:
        return False
    pats = [_pattern(vocab, kind, g) for g in globs]
    if ANY_RESOURCE in names:
        # It may touch any resource of the kind: a block or review rule matches whatever
        # it names, an allow rule only when it allows every resource.
        return not every or any(p in _EVERYTHING for p in pats)
    if every:
        return all(any(fnmatchcase(n, p) for p in pats) for n in names)
    # A name that is itself a pattern (``vault.*``: every table of a schema a statement
    # drops; ``/etc/*``: a glob a shell expands) stands for every name it matches: a block
    # or review rule matches it when the two may meet (either matches the other).
    return any(fnmatchcase(n, p) or (_GLOB_CHARS.intersection(n) and _may_meet(n, p))
               for n in names for p in pats)


def _may_meet(name: str, pattern: str) -> bool:
    """Whether two patterns may match a common name: one matches the other, or (erring
    towards yes) their literal beginnings agree as far as the shorter one goes
    (``/etc/hostnam?`` and ``/etc/hostname*``)."""
    if fnmatchcase(pattern, name):
        return True
    a = name[:min((name.find(c) for c in _GLOB_CHARS if c in name), default=len(name))]
    b = pattern[:min((pattern.find(c) for c in _GLOB_CHARS if c in pattern),
                     default=len(pattern))]
    return a.startswith(b) or b.startswith(a)


def rule_matches(rule: Rule, req: Request, st: StatementLike) -> bool:
    m = rule.match
    if m.users and req.user not in m.users:
        return False
    if m.groups and not set(m.groups) & set(req.groups):
        return False
    if m.connections and req.connection.name not in m.connections:
        return False
    if m.classes and _cls_name(st.cls) not in m.classes:
        return False
    every = rule.action == "allow"
    vocab = req.vocabulary
    narrowed = False
    for kind, globs in m.resources:
        if not globs:
            continue
        narrowed = True
        if not _names_match(getattr(st, kind, ()), globs, every=every, vocab=vocab,
                            kind=kind):
            return False
    if every and narrowed and vocab.code_kind and _cls_name(st.cls) in vocab.write_classes:
        # A rule allowing writes to some resources does not cover code keyturn cannot see
        # into (INSERT INTO allowed SELECT f(), f writing elsewhere): it must name it.
        opaque = getattr(st, "opaque", ())
        code = m.globs(vocab.code_kind)
        if opaque and not (code and _names_match(opaque, code, every=True, vocab=vocab,
                                                 kind=vocab.code_kind)):
            return False
    return True


def _explain(rule: Rule, st: StatementLike) -> str:
    cls = _cls_name(st.cls)
    why = "; ".join(st.reasons)
    base = rule.reason or f"{cls} statement matched rule {rule.name!r}"
    return f"{base} ({why})" if why and not rule.reason else base


def evaluate_statement(policy: Policy, req: Request, st: StatementLike) -> StatementDecision:
    cls = _cls_name(st.cls)
    unknown = req.vocabulary.riskiest  # what cannot be analysed
    if st.forbidden:
        return StatementDecision(st.text, cls, "block", BUILTIN_IDENTITY_RULE, st.forbidden,
                                 getattr(st, "tables", ()),
                                 getattr(st, "functions", ()))
    for rule in policy.rules:
        if rule_matches(rule, req, st):
            if cls == unknown and rule.action in PERMITTING and \
                    unknown not in rule.match.classes:
                return _unknown_refused(st, cls, f"rule {rule.name!r} allows it but does not "
                                                 "name class unknown")
            return StatementDecision(st.text, cls, rule.action, rule.name, _explain(rule, st),
                                     getattr(st, "tables", ()), getattr(st, "functions", ()))
    why = "; ".join(st.reasons)
    if cls == unknown and policy.default_action in PERMITTING:
        return _unknown_refused(st, cls, f"policy {policy.name!r} allows it by default")
    reason = f"no rule of policy {policy.name!r} matched this {cls} statement; default is " \
             f"{policy.default_action}" + (f" ({why})" if why else "")
    return StatementDecision(st.text, cls, policy.default_action, None, reason,
                             getattr(st, "tables", ()), getattr(st, "functions", ()))


def _unknown_refused(st: StatementLike, cls: str, how: str) -> StatementDecision:
    # Fail closed: what the gateway cannot analyse is only let through by a rule that says
    # so in as many words (match: {class: unknown}), never by a default or a broad rule.
    why = "; ".join(st.reasons)
    reason = f"keyturn cannot analyse this statement and {how}; only a rule that names " \
             "class unknown may allow it" + (f" ({why})" if why else "")
    return StatementDecision(st.text, cls, "block", BUILTIN_UNPARSED_RULE, reason,
                             getattr(st, "tables", ()), getattr(st, "functions", ()))


def evaluate(config: Config, req: Request, *,
             verdicts: dict[tuple[Any, ...], StatementDecision] | None = None) -> Decision:
    """The Decision for a request. ``verdicts`` memoises per-statement results
    (the gateway passes one per process; see ``PolicyEngine``)."""
    policy = config.policies[req.connection.policy]
    if req.parse_error is not None or not req.statements:
        if req.parse_error is not None:
            # Fail closed: what cannot be parsed is treated as the riskiest class.
            fake = _Unparsed(req.parse_error, req.vocabulary.riskiest)
            sd = evaluate_statement(policy, req, fake)
            return Decision(sd.action, sd.rule or BUILTIN_UNPARSED_RULE, sd.reason, fake.cls,
                            _review_of(policy, sd.rule), (sd,))
        return Decision("allow", None, "empty query", "read", None, ())
    if verdicts is None:
        decisions = tuple(evaluate_statement(policy, req, st) for st in req.statements)
    else:
        decisions = tuple(_memo_statement(verdicts, policy, req, st) for st in req.statements)
    masks = _masks_of(policy, decisions, req)
    if len(decisions) == 1:
        d = decisions[0]
        return Decision(d.action, d.rule, d.reason, d.classification,
                        _review_of(policy, d.rule) if d.action == "review" else None, decisions,
                        masks)
    worst = decisions[0]
    for d in decisions[1:]:
        if SEVERITY[d.action] > SEVERITY[worst.action]:
            worst = d
    vocab = req.vocabulary
    riskiest = max(req.statements, key=lambda s: vocab.risk(_cls_name(s.cls)))
    reason = worst.reason
    if len(decisions) > 1:
        reason = f"{reason} [statement {decisions.index(worst) + 1} of {len(decisions)}]"
    return Decision(worst.action, worst.rule, reason, _cls_name(riskiest.cls),
                    _review_of(policy, worst.rule), decisions, masks)


def _masks_of(policy: Policy, decisions: Iterable[StatementDecision],
              req: Request | None = None) -> tuple[tuple[str, MaskSettings], ...]:
    """The masking of every deciding rule that masks; and, for a statement another rule
    allowed (a write allowed without ``mask:``), the masking of every mask rule
    meant for this person on this connection, whatever class or tables it names: what a
    person may only see masked stays masked in a RETURNING, an error or a copy, whichever
    rule allowed the statement."""
    out: dict[str, MaskSettings] = {}
    unmasked = False
    for d in decisions:
        rule = next((r for r in policy.rules if r.name == d.rule), None)
        if rule is not None and rule.mask is not None:
            out.setdefault(rule.name, rule.mask)
        elif d.action == "allow":
            # (A reviewed statement is run as its approvers saw it; a blocked one never.)
            unmasked = True
    if unmasked and req is not None:
        for rule in policy.rules:
            m = rule.match
            if rule.mask is None or rule.name in out or \
                    (m.users and req.user not in m.users) or \
                    (m.groups and not set(m.groups) & set(req.groups)) or \
                    (m.connections and req.connection.name not in m.connections):
                continue
            out[rule.name] = rule.mask
    return tuple(out.items())


def masks_in(policy: Policy) -> bool:
    """Whether any rule of the policy masks results (the gateway then inspects rows)."""
    return any(rule.mask is not None for rule in policy.rules)


def _memo_statement(verdicts: dict[tuple[Any, ...], StatementDecision], policy: Policy,
                    req: Request, st: StatementLike) -> StatementDecision:
    # Everything a verdict depends on, except the statement text itself.
    key = (req.connection.name, req.user, req.groups, st.cls, st.forbidden, st.reasons,
           *[getattr(st, kind, ()) for kind in req.vocabulary.resources])
    hit = verdicts.get(key)
    if hit is None:
        if len(verdicts) > 20_000:
            verdicts.clear()
        hit = verdicts[key] = evaluate_statement(policy, req, st)
    if hit.text == st.text:
        return hit
    return StatementDecision(st.text, hit.classification, hit.action, hit.rule, hit.reason,
                             hit.tables, hit.functions)


class PolicyEngine:
    """``evaluate`` with a per-process memo of statement verdicts (hot path).

    A cached decision — in this memo, in a session, in the compiled fast path — is only
    as good as what it was made with: the policies, and later grants and identities.
    ``bump()`` (a policy reload, a grant given or ended, a revocation) starts a new
    ``generation``: the memo is dropped and every listener is told at once (the gateways
    drop their sessions' memos, including the dictionaries the fast path reads). Call it
    from the event loop thread of the listeners."""

    def __init__(self, config: Config):
        self.config = config
        self._verdicts: dict[tuple[Any, ...], StatementDecision] = {}
        self.generation = 0
        self._listeners: list[Callable[[int], None]] = []

    def evaluate(self, req: Request) -> Decision:
        return evaluate(self.config, req, verdicts=self._verdicts)

    def listen(self, callback: Callable[[int], None]) -> None:
        """``callback(generation)`` after every bump."""
        self._listeners.append(callback)

    def bump(self, why: str) -> int:
        self.generation += 1
        self._verdicts = {}
        log.info("decisions made before now no longer apply (%s): generation %d", why,
                 self.generation)
        for callback in self._listeners:
            callback(self.generation)
        return self.generation

    def replace(self, config: Config, why: str = "policy reload") -> None:
        """Decide with ``config``'s policies from now on."""
        self.config = config
        self.bump(why)


def _review_of(policy: Policy, rule_name: str | None) -> ReviewSettings | None:
    for rule in policy.rules:
        if rule.name == rule_name:
            return rule.review
    return None


@dataclass(frozen=True)
class _Unparsed:
    error: str
    cls: str  # the protocol's riskiest class
    text: str = ""
    forbidden: str | None = None

    @property
    def reasons(self) -> tuple[str, ...]:
        return (f"could not parse: {self.error}",)
