"""The protocol-neutral request model (keyturn.request): policy evaluation knows only the
vocabulary a protocol registers — its classes, write classes and resource kinds — so a
protocol that is not SQL is decided by the same code, and PostgreSQL's rules keep
working as before."""

from __future__ import annotations

from dataclasses import dataclass

from keyturn.config import Connection, Match, Policy, ReviewSettings, Rule, Target
from keyturn.policy import evaluate
from keyturn.request import Request, Vocabulary, known_classes, register, vocabulary

HTTPISH = register(Vocabulary(
    protocol="test-http", classes=("read", "write", "delete", "admin", "unknown"),
    write_classes=frozenset({"write", "delete", "admin"}), resources=("paths", "methods"),
    normalize=lambda kind, glob: glob.upper() if kind == "methods" else glob))


@dataclass(frozen=True)
class Call:
    text: str
    cls: str
    paths: tuple[str, ...]
    methods: tuple[str, ...]
    reasons: tuple[str, ...] = ()
    forbidden: str | None = None


def config(policy: Policy) -> object:
    @dataclass(frozen=True)
    class Cfg:
        policies: dict[str, Policy]

    return Cfg({policy.name: policy})


CONN = Connection(name="api", type="test-http", target=Target("127.0.0.1", 443), policy="p")


def decide(policy: Policy, *calls: Call, parse_error: str | None = None) -> tuple[str, str]:
    d = evaluate(config(policy), Request("alice", ("engineers",), CONN, calls,  # type: ignore[arg-type]
                                         parse_error))
    return d.action, d.classification


POLICY = Policy("p", (
    Rule("reads", Match(classes=("read",)), "allow"),
    Rule("deletes", Match(classes=("delete",), resources=(("paths", ("/orders/*",)),)),
         "review", review=ReviewSettings(("approvers",))),
    Rule("writes-to-carts", Match(classes=("write",), resources=(
        ("paths", ("/carts/*",)), ("methods", ("put", "post"))),), "allow"),
), default_action="block")


def test_a_non_sql_protocol_is_decided_by_its_vocabulary() -> None:
    assert decide(POLICY, Call("GET /orders/1", "read", ("/orders/1",), ("GET",))) == \
        ("allow", "read")
    assert decide(POLICY, Call("DELETE /orders/1", "delete", ("/orders/1",), ("DELETE",))) == \
        ("review", "delete")
    # Globs are spelled by the protocol's rules (methods upper-cased here)...
    assert decide(POLICY, Call("PUT /carts/9", "write", ("/carts/9",), ("PUT",)))[0] == "allow"
    # ...and an allow rule matches only when every resource of the action does.
    assert decide(POLICY, Call("PATCH /carts/9", "write", ("/carts/9",), ("PATCH",)))[0] == \
        "block"
    # Several actions: the most severe decision, the riskiest class by this vocabulary.
    assert decide(POLICY, Call("GET /a", "read", ("/a",), ("GET",)),
                  Call("DELETE /orders/2", "delete", ("/orders/2",), ("DELETE",))) == \
        ("review", "delete")


def test_what_cannot_be_analysed_is_the_vocabularys_riskiest_class() -> None:
    assert vocabulary("test-http").riskiest == "unknown"
    lenient = Policy("p", (Rule("anything", Match(), "allow"),), default_action="allow")
    assert decide(lenient, parse_error="bad request line") == ("block", "unknown")
    assert decide(lenient, Call("?", "unknown", (), ())) == ("block", "unknown")


def test_config_knows_every_registered_class_and_resource_kind() -> None:
    from keyturn.config import parse_config

    assert {"delete", "read", "ddl"} <= set(known_classes())
    cfg = parse_config("""
store: {url: "sqlite:///:memory:"}
identity: {users: {alice: {groups: [engineers]}}}
connections:
  - {name: shop, type: postgres, target: {host: h, port: 5432, user: app, password_env: X},
     policy: p}
policies:
  p:
    rules:
      - {name: r1, match: {class: delete, paths: ["/orders/*"], methods: [DELETE]},
         action: block}
      - {name: r2, match: {class: write, tables: [Orders]}, action: allow}
""", "k.yaml")
    rules = cfg.policies["p"].rules
    assert rules[0].match.globs("paths") == ("/orders/*",)
    assert rules[1].match.tables == ("Orders",)  # as written; SQL spells it at match time
