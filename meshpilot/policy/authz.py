"""``AuthorizationPolicy``: who may call a service, and what, enforced by the callee's sidecar.

A policy selects one service of its namespace (``service``) or all of them (no ``service``) and
either ALLOWs or DENYs the requests its rules match. A rule matches when one of its ``from``
entries, one of its ``to`` entries and every ``when`` condition match (an empty section matches
anything); within an entry, every field given must match, and any value of a field will do.
Precedence, as in Istio: a request any DENY rule matches is refused; otherwise, once an ALLOW
policy selects the service, only what some ALLOW rule matches passes (an ALLOW policy without
rules allows nothing); a service no ALLOW policy selects allows everything not denied.

Callers are known by their certificates: ``principals`` are SPIFFE ids (``*``: any caller with a
certificate), ``services`` and ``namespaces`` are shorthands for the ids of their workloads. A
plaintext caller has no principal, so it matches no ``from`` entry that names one. ``to`` matches
the service port the caller asked for (``ports``), the path (``paths`` exact, ``prefixes``) and
the method, or operations of the service's API (``apis``: by name, or by method + path template,
the selectors of the governance kinds); ``when`` matches request headers.

``inbound_authz`` turns the policies selecting a node's service into the two RBAC rule sets its
inbound listener's filters take from its routes (translate/listeners.py ``InboundAuthz``), so a
change travels by RDS and applies to open connections without a listener drain. Inbound routes
have one catch-all route per node (no per-API routes), so an API selector becomes a permission that
matches exactly its operation: the method and the path template as an anchored regex on the
normalised path without its query. A name the service does not declare (or a template that cannot
be matched) never widens an ALLOW (the selector matches nothing) and never vanishes from a DENY (the
selector matches any operation, so the entry refuses more, as an HTTP-only condition does on TCP).

A TCP service has no routes: its rules are network RBAC filters on its inbound listener's chains
(a policy change there changes the listener, which drains its connections). A connection has no
path, method or header, so a DENY rule ignores those conditions (refusing more) and an ALLOW rule
that needs one never matches (admitting less): an HTTP-only condition never opens a TCP service.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Literal

from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2
from pydantic import BaseModel, ConfigDict, Field, field_validator

from meshpilot.model import ApiOperation, dns_label
from meshpilot.pki import spiffe_id
from meshpilot.policy._filterspec import ApiSelector
from meshpilot.policy.kinds import PolicyBase, PolicyKind, TranslateContext, Translation, register_kind
from meshpilot.translate.listeners import InboundAuthz

__all__ = ["AUTHZ", "AuthorizationPolicy", "Condition", "Operation", "Peer", "Rule", "inbound_authz", "path_template_regex", "selects"]

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")
_HEADER = re.compile(r"^:?[a-z0-9!#$%&'*+.^_`|~-]{1,128}$")
_SPIFFE = re.compile(r"^spiffe://[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+$")
_PATH = r"^/[^\s?#]{0,1023}$"


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True, populate_by_name=True,
                              serialize_by_alias=True)


class Peer(_Spec):
    """Who calls: every field given must match (any of its values)."""

    principals: list[str] = Field(default_factory=list, max_length=64, description="SPIFFE ids of callers; '*': any caller with a certificate")
    services: list[str] = Field(default_factory=list, max_length=64, description="calling services: 'name' (the policy's namespace) or 'name.namespace'")
    namespaces: list[str] = Field(default_factory=list, max_length=64, description="any service of these namespaces")

    @field_validator("principals")
    @classmethod
    def _principals(cls, v: list[str]) -> list[str]:
        for p in v:
            if p != "*" and not _SPIFFE.match(p):
                raise ValueError(f"expected a SPIFFE id (spiffe://<trust domain>/ns/<namespace>/sa/<service>) or '*', got {p!r}")
        return v

    @field_validator("services")
    @classmethod
    def _services(cls, v: list[str]) -> list[str]:
        out = []
        for s in v:
            name, dot, ns = s.partition(".")
            out.append(dns_label(name, "service") + (("." + dns_label(ns, "namespace")) if dot else ""))
        return out

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, v: list[str]) -> list[str]:
        return [dns_label(n, "namespace") for n in v]


class Operation(_Spec):
    """What is called: every field given must match (any of its values)."""

    ports: list[int] = Field(default_factory=list, max_length=64, description="service ports (the port the caller asked for)")
    paths: list[str] = Field(default_factory=list, max_length=64, description="exact paths (without the query)")
    prefixes: list[str] = Field(default_factory=list, max_length=64, description="path prefixes")
    methods: list[str] = Field(default_factory=list, max_length=16, description="upper-case HTTP methods")
    apis: list[ApiSelector] = Field(default_factory=list, max_length=64, description="operations of the target service: by name, or method + path template (/users/{id}, /static/**)")

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if not 1 <= p <= 65535:
                raise ValueError(f"ports are 1-65535, got {p}")
        return v

    @field_validator("paths", "prefixes")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.match(_PATH, p):
                raise ValueError(f"paths start with / and have no spaces, query or fragment (at most 1024 characters), got {p!r}")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        for m in v:
            if m not in _METHODS:
                raise ValueError(f"methods are upper-case, one of {', '.join(_METHODS)}; got {m!r}")
        return v


class Condition(_Spec):
    """A request header that must have one of ``values``."""

    header: str = Field(description="header name (lower-case)")
    values: list[str] = Field(min_length=1, max_length=64, description="accepted values (exact)")

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        v = v.lower()
        if not _HEADER.match(v):
            raise ValueError("header name must be an HTTP token of 1-128 characters")
        return v


class Rule(_Spec):
    from_: list[Peer] = Field(default_factory=list, alias="from", max_length=64, description="callers (any entry); omitted: anyone")
    to: list[Operation] = Field(default_factory=list, max_length=64, description="operations (any entry); omitted: anything")
    when: list[Condition] = Field(default_factory=list, max_length=64, description="conditions (all of them)")


class AuthorizationPolicy(PolicyBase):
    """ALLOW or DENY the calls its rules match, into one service of its namespace or all of them."""

    kind_name = "AuthorizationPolicy"

    service: str | None = Field(default=None, description="the service (in the policy's namespace); omitted: every service of the namespace")
    action: Literal["ALLOW", "DENY"] = Field(default="ALLOW", description="ALLOW: only what the rules match passes; DENY: what they match is refused")
    rules: list[Rule] = Field(default_factory=list, max_length=64, description="omitted: an ALLOW policy allows nothing, a DENY policy denies nothing")

    @field_validator("service")
    @classmethod
    def _service(cls, v: str | None) -> str | None:
        return None if v is None else dns_label(v, "service")

    @field_validator("action", mode="before")
    @classmethod
    def _action(cls, v: Any) -> Any:
        return v.strip().upper() if isinstance(v, str) else v

    def target_services(self) -> set[str]:
        return {f"{self.service}.{self.namespace}"} if self.service else set()


def _check(policy: AuthorizationPolicy) -> list[dict[str, str]]:
    """What the model cannot say: entries that name nothing would match everything, which a reader
    of the policy would not expect from an entry that is there."""
    problems: list[dict[str, str]] = []
    for i, rule in enumerate(policy.rules):
        for j, peer in enumerate(rule.from_):
            if not (peer.principals or peer.services or peer.namespaces):
                problems.append({"field": f"rules.{i}.from.{j}", "reason": "give principals, services or namespaces (omit from to match anyone)"})
        for j, op in enumerate(rule.to):
            if not (op.ports or op.paths or op.prefixes or op.methods or op.apis):
                problems.append({"field": f"rules.{i}.to.{j}", "reason": "give ports, paths, prefixes, methods or apis (omit to to match anything)"})
            if op.apis and (op.paths or op.prefixes or op.methods):
                problems.append({"field": f"rules.{i}.to.{j}.apis", "reason": "an API names its method and path: give apis, or paths, prefixes and methods, in separate entries"})
            for k, sel in enumerate(op.apis):
                field = f"rules.{i}.to.{j}.apis.{k}"
                if sel.route is not None:
                    problems.append({"field": f"{field}.route", "reason": "inbound rules have no per-API routes: select by name or method + path"})
                elif sel.named is not None and policy.service is None:
                    problems.append({"field": f"{field}.{'name' if sel.name is not None else 'operation'}", "reason": "an API name is one service's: give the policy a service, or select by method + path"})
                elif sel.path is not None and path_template_regex(sel.path) is None:
                    problems.append({"field": f"{field}.path", "reason": f"expected a template like /orders/{{id}} or /api/** ('{{name}}' or '*': one segment, '**': the rest, last only), got {sel.path!r}"})
        seen: set[str] = set()
        for j, cond in enumerate(rule.when):
            if cond.header in seen:
                problems.append({"field": f"rules.{i}.when.{j}.header", "reason": f"{cond.header} is already a condition of this rule (list its values once)"})
            seen.add(cond.header)
    return problems


# ---- translation -----------------------------------------------------------------------------


def selects(policy: AuthorizationPolicy, namespace: str, service: str) -> bool:
    return policy.namespace == namespace and (policy.service is None or policy.service == service)


def _any_principal(ids: Iterable[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    ids = list(ids)
    return ids[0] if len(ids) == 1 else rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ids))


def _authenticated(matcher: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=matcher))


def _peer(peer: Peer, policy_ns: str, trust_domain: str) -> rbac_pb2.Principal:
    parts: list[rbac_pb2.Principal] = []
    if peer.principals:
        parts.append(_any_principal(
            _authenticated(string_pb2.StringMatcher(prefix="spiffe://") if p == "*" else string_pb2.StringMatcher(exact=p))
            for p in peer.principals))
    if peer.services:
        ids = []
        for s in peer.services:
            name, _, ns = s.partition(".")
            ids.append(_authenticated(string_pb2.StringMatcher(exact=spiffe_id(trust_domain, ns or policy_ns, name))))
        parts.append(_any_principal(ids))
    if peer.namespaces:
        parts.append(_any_principal(
            _authenticated(string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain}/ns/{ns}/sa/")) for ns in peer.namespaces))
    return parts[0] if len(parts) == 1 else rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=parts))


def _any_permission(rules: Iterable[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    rules = list(rules)
    return rules[0] if len(rules) == 1 else rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=rules))


def _header(name: str, value: str) -> rc.HeaderMatcher:
    return rc.HeaderMatcher(name=name, string_match=string_pb2.StringMatcher(exact=value))


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


def _literal(segment: str) -> list[str]:
    """A literal segment as the inbound manager leaves it in a path (percent-encoded unreserved
    characters decoded, other characters than ASCII percent-encoded as UTF-8), escaped for RE2:
    letters, digits and '_' stand for themselves, every other character is escaped."""
    def decode(m: re.Match[str]) -> str:
        c = chr(int(m.group(1), 16))
        return c if c in _UNRESERVED else m.group(0)

    out: list[str] = []
    for c in _PERCENT.sub(decode, segment):
        if not c.isascii():
            for b in c.encode():
                out += ["\\%", *f"{b:02X}"]
        elif c.isalnum() or c == "_":
            out.append(c)
        else:
            out.append("\\" + c)
    return out


def path_template_regex(template: str) -> str | None:
    """The RE2 pattern matching exactly the normalised paths (no query) of an API path template,
    or None when ``template`` is not one. Templates are the governance filter's: ``{name}`` or
    ``*`` is one non-empty segment without '/', a last ``**`` is the rest of the path (possibly
    empty: ``/api/**`` matches ``/api``), anything else a literal segment. The template is
    normalised as the inbound manager normalises paths (doubled slashes merged, dot segments
    resolved), so ``/a//b`` and ``/a/./b`` are ``/a/b``."""
    if not template.startswith("/") or len(template) > 1024 or any(c in template for c in "?#") or any(c.isspace() for c in template):
        return None
    raw = template[1:].split("/")
    segments: list[str] = []
    for i, seg in enumerate(raw):
        if seg == "." or (seg == "" and i < len(raw) - 1):
            continue  # merged slash or dot segment; a last empty segment is a trailing slash
        if seg == "..":
            if segments:
                segments.pop()
            continue
        segments.append(seg)
    if raw and raw[-1] in (".", ".."):
        segments.append("")  # /a/b/.. is /a/ as a path
    pieces: list[tuple[str, list[str]]] = []  # (kind, RE2 atoms): "lit" | "one" | "rest"
    for i, seg in enumerate(segments):
        if seg == "**":
            if i != len(segments) - 1:
                return None
            pieces.append(("rest", ["(/.*)?"]))
        elif seg == "*" or (len(seg) > 2 and seg[0] == "{" and seg[-1] == "}" and not any(c in seg[1:-1] for c in "{}*")):
            pieces += [("lit", ["/"]), ("one", ["[^/]+"])]
        elif any(c in seg for c in "{}*"):
            return None
        else:
            pieces.append(("lit", ["/", *_literal(seg)]))
    if not pieces:
        pieces.append(("lit", ["/"]))
    if _program_size(pieces) > _MAX_PROGRAM:
        return None
    return "^" + "".join("".join(atoms) for _, atoms in pieces) + "$"


# Envoy refuses a whole route configuration with a regex whose RE2 program is larger than 100
# instructions (runtime re2.max_program_size.error_level). Measured in Envoy 1.40: the literal
# prefix of an anchored pattern costs nothing (RE2 matches it outside the program), then each
# literal character costs 1, each [^/]+ 3, a last (/.*)? 6, plus 4; keep a margin below the limit.
_MAX_PROGRAM = 90
_COST = {"one": 3, "rest": 6}


def _program_size(pieces: Sequence[tuple[str, list[str]]]) -> int:
    size, in_prefix = 4, True
    for kind, atoms in pieces:
        in_prefix = in_prefix and kind == "lit"
        if not in_prefix:
            size += _COST.get(kind, len(atoms))
    return size


def _api_permission(method: str | None, template: str) -> rbac_pb2.Permission | None:
    """Exactly one operation: the method (None or '*': any) and the path template; None when the
    template cannot be matched."""
    pattern = path_template_regex(template)
    if pattern is None:
        return None
    path = rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=string_pb2.StringMatcher(
        safe_regex=regex_pb2.RegexMatcher(regex=pattern))))
    if method is None or method == "*":
        return path
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=[rbac_pb2.Permission(header=_header(":method", method)), path]))


def _apis(selectors: Sequence[ApiSelector], declared: Sequence[ApiOperation] | None, deny: bool) -> rbac_pb2.Permission | None:
    """The operations the selectors name, any of them; None when they match nothing. A selector
    that resolves to no operation (a name the service does not declare, or the service unknown;
    a template that cannot be matched) matches nothing in an ALLOW rule and anything in a DENY
    rule: it neither widens what is allowed nor drops what is denied."""
    perms: list[rbac_pb2.Permission] = []
    for sel in selectors:
        if sel.named is not None:
            op = next((o for o in declared or () if o.name == sel.named), None)
            perm = _api_permission(op.method, op.path) if op is not None else None
        elif sel.path is not None:
            perm = _api_permission(sel.method, sel.path)
        else:
            perm = None  # a route selector: refused by the check, no route to match inbound
        if perm is None:
            if deny:
                return rbac_pb2.Permission(any=True)
            continue
        perms.append(perm)
    return _any_permission(perms) if perms else None


def _operation(op: Operation, ports: Collection[int], declared: Sequence[ApiOperation] | None = None,
               deny: bool = False) -> rbac_pb2.Permission | None:
    """None: the entry cannot match on this node (none of its ports is one the node serves, or
    none of its APIs resolves in an ALLOW rule)."""
    parts: list[rbac_pb2.Permission] = []
    if op.ports and not set(op.ports) & set(ports):
        return None
    if op.apis:
        apis = _apis(op.apis, declared, deny)
        if apis is None:
            return None
        parts.append(apis)
    if op.paths or op.prefixes:
        paths = [string_pb2.StringMatcher(exact=p) for p in op.paths] + [string_pb2.StringMatcher(prefix=p) for p in op.prefixes]
        parts.append(_any_permission(rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=m)) for m in paths))
    if op.methods:
        parts.append(_any_permission(rbac_pb2.Permission(header=_header(":method", m)) for m in op.methods))
    if not parts:
        return rbac_pb2.Permission(any=True)
    return parts[0] if len(parts) == 1 else rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=parts))


def _rule(rule: Rule, policy_ns: str, trust_domain: str, ports: Collection[int], declared: Sequence[ApiOperation] | None = None,
          deny: bool = False) -> rbac_pb2.Policy | None:
    """The rule as an RBAC policy; None when it can match nothing on this node. ``declared``: the
    service's API operations (None: the service is not known)."""
    perms: list[rbac_pb2.Permission] = []
    if rule.to:
        ops = [p for op in rule.to if (p := _operation(op, ports, declared, deny)) is not None]
        if not ops:
            return None
        perms.append(_any_permission(ops))
    for cond in rule.when:
        perms.append(_any_permission(rbac_pb2.Permission(header=_header(cond.header, v)) for v in cond.values))
    permission = (perms[0] if len(perms) == 1 else rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=perms))
                  ) if perms else rbac_pb2.Permission(any=True)
    principal = _any_principal(_peer(p, policy_ns, trust_domain) for p in rule.from_) if rule.from_ else rbac_pb2.Principal(any=True)
    return rbac_pb2.Policy(permissions=[permission], principals=[principal])


def _tcp_rule(rule: Rule, policy_ns: str, trust_domain: str, ports: Collection[int], deny: bool) -> rbac_pb2.Policy | None:
    """The rule for a TCP service, where a connection has no path, method or header: a DENY rule
    ignores those conditions (it then refuses more: every connection its callers and ports match),
    an ALLOW rule that needs any of them never matches (it then admits less). Either way an
    HTTP-only condition can never open a TCP service up."""
    if rule.when and not deny:
        return None
    if rule.to:
        served = [op for op in rule.to if not op.ports or set(op.ports) & set(ports)]
        if not deny:
            served = [op for op in served if not (op.paths or op.prefixes or op.methods or op.apis)]
        if not served:
            return None
    principal = _any_principal(_peer(p, policy_ns, trust_domain) for p in rule.from_) if rule.from_ else rbac_pb2.Principal(any=True)
    return rbac_pb2.Policy(permissions=[rbac_pb2.Permission(any=True)], principals=[principal])


def _rbac(action: rbac_pb2.RBAC.Action.ValueType, policies: Sequence[AuthorizationPolicy], trust_domain: str, ports: Collection[int],
          tcp: bool = False, declared: Sequence[ApiOperation] | None = None) -> rbac_pb2.RBAC:
    out = rbac_pb2.RBAC(action=action)
    for p in policies:
        for i, rule in enumerate(p.rules):
            if tcp:
                built = _tcp_rule(rule, p.namespace, trust_domain, ports, action == rbac_pb2.RBAC.DENY)
            else:
                built = _rule(rule, p.namespace, trust_domain, ports, declared, action == rbac_pb2.RBAC.DENY)
            if built is not None:
                out.policies[f"{p.namespace}/{p.name}/{i}"].CopyFrom(built)
    return out


def inbound_authz(
    policies: Iterable[AuthorizationPolicy], namespace: str, service: str, ports: Collection[int], trust_domain: str,
    apis: Sequence[ApiOperation] | None = None,
) -> InboundAuthz | None:
    """The RBAC rules for a node of ``service`` that serves ``ports`` (service port numbers), or
    None when no policy selects the service: for HTTP (``deny``, ``allow``: the inbound routes'
    per-route rules) and for TCP (``tcp_deny``, ``tcp_allow``: the network RBAC filters of a TCP
    inbound listener, see ``_tcp_rule``). ``apis``: the service's API operations, which API
    selectors by name resolve in (None: the service is not known, so no name resolves)."""
    chosen = sorted((p for p in policies if selects(p, namespace, service)), key=lambda p: p.key)
    if not chosen:
        return None
    deny = [p for p in chosen if p.action == "DENY"]
    allow = [p for p in chosen if p.action == "ALLOW"]
    return InboundAuthz(
        deny=_rbac(rbac_pb2.RBAC.DENY, deny, trust_domain, ports, declared=apis) if deny else None,
        allow=_rbac(rbac_pb2.RBAC.ALLOW, allow, trust_domain, ports, declared=apis) if allow else None,
        tcp_deny=_rbac(rbac_pb2.RBAC.DENY, deny, trust_domain, ports, tcp=True) if deny else None,
        tcp_allow=_rbac(rbac_pb2.RBAC.ALLOW, allow, trust_domain, ports, tcp=True) if allow else None,
    )


def _translate(policies: Sequence[Any], ctx: TranslateContext) -> Translation:
    # the rules reach each node's inbound routes through the registry's translation (policy/mesh.py)
    return Translation()


AUTHZ = register_kind(
    PolicyKind(
        name="AuthorizationPolicy",
        model=AuthorizationPolicy,
        translate=_translate,
        summary="allow or deny calls into a service by caller identity (mTLS), port, path, method, API and headers",
        check=_check,
        exclusive=False,
        aliases=("authz", "authorization", "authorizationpolicies"),
    )
)
