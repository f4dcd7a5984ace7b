"""Alert rules and the state machine of their alerts. Pure: no I/O.

A rule compares one number to a threshold: either the count of log records that match (service,
source, level, text) over a window (``log``), or the value of a PromQL expression on the mesh's
Prometheus (``metric``). ``for`` is how long the comparison must hold before the alert fires, as in
Prometheus' alerting rules: a rule is ``inactive`` while it does not hold, ``pending`` from the first
evaluation where it holds, ``firing`` once it has held for ``for`` (at once when ``for`` is 0), and
``inactive`` again at the first evaluation where it does not. An evaluation that fails (Prometheus
unreachable, a query it refuses) changes no state and is reported as the rule's ``error``.
``AlertRule`` validates a rule where it enters (every error names the field); ``step`` moves a state.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meshpilot.telemetry.logs import LogMatch

__all__ = ["AlertRule", "AlertState", "LogQuery", "MetricQuery", "compare", "parse_duration", "pick", "step"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
MAX_DURATION_S = 86_400.0
Op = Literal[">", ">=", "<", "<=", "==", "!="]


def parse_duration(v: Any) -> float:
    """Seconds from a number or ``500ms``, ``30s``, ``5m``, ``1h``, ``1d``: 0 to 24h."""
    if isinstance(v, bool):
        raise ValueError("must be a duration such as 30s, 5m or 1h")
    if isinstance(v, (int, float)):
        n = float(v)
    elif isinstance(v, str):
        m = _DURATION.match(v)
        if not m:
            raise ValueError(f"must be a duration such as 30s, 5m or 1h, got {v[:40]!r}")
        n = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise ValueError("must be a duration such as 30s, 5m or 1h")
    if not math.isfinite(n) or not 0 <= n <= MAX_DURATION_S:
        raise ValueError(f"must be between 0 and 24h, got {v!r}")
    return n


# a duration is seconds or text such as 30s, 5m, 1h (parse_duration)
_DURATION_SCHEMA: dict[str, Any] = {"anyOf": [
    {"type": "number", "minimum": 0, "maximum": MAX_DURATION_S},
    {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
]}



def _duration_schema(schema: dict[str, Any]) -> None:
    schema.pop("type", None)
    schema.update(_DURATION_SCHEMA)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class LogQuery(_Model):
    """Count the log records that match over ``window`` (every given field must hold)."""

    service: str = Field(default="", max_length=256, description="name or name.namespace; empty: every service")
    instance: str = Field(default="", max_length=256)
    source: Literal["", "access", "app"] = ""
    level: Literal["", "debug", "info", "warn", "error"] = Field(default="", description="this level and above")
    text: str = Field(default="", max_length=1024, description="a case-insensitive substring of the line")
    window: float = Field(description="e.g. 5m; from 1s to 24h", json_schema_extra=_duration_schema)

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> float:
        n = parse_duration(v)
        if n < 1:
            raise ValueError("must be at least 1s")
        return n

    def match(self) -> LogMatch:
        return LogMatch(service=self.service.lower(), instance=self.instance, source=self.source, level=self.level,
                        text=self.text)


class MetricQuery(_Model):
    """A PromQL expression evaluated at the time of each evaluation on ``prometheus_url``."""

    query: str = Field(min_length=1, max_length=4096, description="PromQL; a vector of several series fires when any of them holds")


class AlertRule(_Model):
    """An alert rule: ``log`` or ``metric`` (one of them), compared with ``op`` to ``threshold``."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", description="the rule's name (its key)")
    description: str = Field(default="", max_length=1024)
    log: LogQuery | None = None
    metric: MetricQuery | None = None
    op: Op = ">"
    threshold: float = Field(allow_inf_nan=False)
    for_: float = Field(default=0.0, alias="for", description="how long it must hold before it fires, e.g. 1m",
                        json_schema_extra=_duration_schema)

    model_config = ConfigDict(
        extra="forbid", str_strip_whitespace=True, populate_by_name=True,
        # exactly one of log and metric, as the schema says it too
        json_schema_extra={"oneOf": [{"required": ["log"], "properties": {"log": {"type": "object"}}},
                                     {"required": ["metric"], "properties": {"metric": {"type": "object"}}}]},
    )

    @field_validator("for_", mode="before")
    @classmethod
    def _for(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _one_query(self) -> AlertRule:
        if (self.log is None) == (self.metric is None):
            raise ValueError("give one of log or metric")
        return self

    @property
    def kind(self) -> str:
        return "log" if self.log is not None else "metric"

    def doc(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def digest(self) -> str:
        """Names this rule's content: a state kept for another digest is of a replaced rule."""
        return hashlib.blake2b(json.dumps(self.doc(), sort_keys=True).encode(), digest_size=16).hexdigest()


def compare(value: float, op: str, threshold: float) -> bool:
    return {">": value > threshold, ">=": value >= threshold, "<": value < threshold, "<=": value <= threshold,
            "==": value == threshold, "!=": value != threshold}[op]


def pick(values: list[float], op: str, threshold: float) -> tuple[float | None, bool]:
    """(the value to report, whether the rule holds) for the values of a query's series: it holds when
    any series does; the value is the first that holds, else the one closest to holding (None: no series)."""
    if not values:
        return None, False
    for v in values:
        if compare(v, op, threshold):
            return v, True
    if op in (">", ">="):
        return max(values), False
    if op in ("<", "<="):
        return min(values), False
    return values[0], False


@dataclass(frozen=True, slots=True)
class AlertState:
    state: Literal["inactive", "pending", "firing"] = "inactive"
    since: float | None = None  # when it entered this state (None: never evaluated)
    value: float | None = None
    evaluated_at: float | None = None
    error: str = ""  # the last evaluation's failure ("" when it succeeded)
    rule: str = ""  # digest of the rule this state is of (AlertRule.digest): another rule starts inactive

    def doc(self) -> dict[str, Any]:
        return {"state": self.state, "since": self.since, "value": self.value, "evaluated_at": self.evaluated_at,
                "error": self.error or None}


def step(prev: AlertState, now: float, for_s: float, holds: bool, value: float | None, error: str = "") -> AlertState:
    """The state after an evaluation at ``now``; ``error``: it failed (the state stays)."""
    if error:
        return replace(prev, evaluated_at=now, error=error)
    if not holds:
        if prev.state == "inactive" and prev.since is not None:
            return replace(prev, value=value, evaluated_at=now, error="")
        return AlertState("inactive", now, value, now)
    if prev.state == "firing":
        return replace(prev, value=value, evaluated_at=now, error="")
    if prev.state == "pending":
        assert prev.since is not None
        if now - prev.since >= for_s:
            return AlertState("firing", now, value, now)
        return replace(prev, value=value, evaluated_at=now, error="")
    return AlertState("firing" if for_s <= 0 else "pending", now, value, now)
