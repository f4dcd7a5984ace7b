//! The filter configuration: a small line-based text format and its parser.
//!
//! The control plane renders policies into this format (`meshpilot/wasm/config.py`) and delivers it as
//! the plugin configuration; `proxy_on_configure` parses it and refuses the whole document on the first
//! error, which Envoy turns into a NACK. The format (documented in docs/filters.md):
//!
//! ```text
//! # comment
//! [filter]                 # optional; global settings
//! tick_ms = 100
//! max_keys = 1024
//!
//! [breaker orders]         # a circuit-breaker rule named "orders"
//! match.cluster = orders
//! per = service
//! window = count
//! window_size = 20
//! ...
//!
//! [ratelimit per-caller]   # a rate-limit rule
//! key = caller
//! rate = 100/s
//! burst = 20
//! ```
//!
//! Values are the text after the first `=`, trimmed. Unknown sections or keys, repeated keys (other than
//! `reply_header`), out-of-range numbers and malformed durations are errors naming the line.

use std::fmt;

/// Upper bounds that keep a hostile or mistaken document from costing memory or time.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
pub const MAX_LINE_BYTES: usize = 4096;
pub const MAX_RULES: usize = 64;
pub const MAX_COUNT_WINDOW: u32 = 4096;
pub const MAX_TIME_WINDOW_S: u32 = 600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "config: {}", self.reason)
        } else {
            write!(f, "config line {}: {}", self.line, self.reason)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSeg {
    Lit(String),
    /// `*` or `{name}`: exactly one segment.
    One,
    /// `**`: the rest of the path, possibly empty (last segment only).
    Rest,
}

/// Which requests a rule applies to; every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    pub cluster: Option<String>,
    pub route: Option<String>,
    pub method: Option<String>,
    pub path: Option<Vec<PathSeg>>,
}

impl Match {
    /// True if `path` (without query) matches the template, or there is no template.
    pub fn path_matches(&self, path: &[u8]) -> bool {
        let tpl = match &self.path {
            None => return true,
            Some(t) => t,
        };
        let path = match path.iter().position(|&b| b == b'?') {
            Some(i) => &path[..i],
            None => path,
        };
        let mut segs = path.split(|&b| b == b'/').skip(1);
        for seg in tpl {
            match seg {
                PathSeg::Rest => return true,
                PathSeg::One => match segs.next() {
                    Some(s) if !s.is_empty() => {}
                    _ => return false,
                },
                PathSeg::Lit(l) => match segs.next() {
                    Some(s) if s == l.as_bytes() => {}
                    _ => return false,
                },
            }
        }
        segs.next().is_none()
    }
}

/// The local reply sent when a rule rejects a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerPer {
    /// One breaker per upstream cluster (`xds.cluster_name`).
    Service,
    /// One breaker per route (`xds.route_name`).
    Route,
    /// One breaker for everything the rule matches (e.g. one API by method + path template).
    Rule,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    Count,
    Time,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerRule {
    pub name: String,
    pub matcher: Match,
    pub per: BreakerPer,
    pub window: WindowKind,
    /// Calls (count window) or seconds (time window).
    pub window_size: u32,
    pub min_calls: u32,
    /// Thresholds in basis points (1/100 of a percent): 5000 = 50 %.
    pub failure_rate_bp: u32,
    pub failure_status: Vec<(u16, u16)>,
    /// 0 disables slow-call tracking.
    pub slow_call_ns: u64,
    pub slow_call_rate_bp: u32,
    pub open_wait_ns: u64,
    pub half_open_calls: u32,
    pub reply: Reply,
}

impl BreakerRule {
    pub fn is_failure_status(&self, status: u32) -> bool {
        self.failure_status.iter().any(|&(lo, hi)| status >= lo as u32 && status <= hi as u32)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    Service,
    Route,
    /// The `x-mesh-caller` header set by the calling sidecar.
    Caller,
    /// The value of a request header (lower-case name).
    Header(String),
    /// One bucket for everything the rule matches.
    Rule,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRule {
    pub name: String,
    pub matcher: Match,
    pub key: LimitKey,
    /// Tokens per second, in millionths of a token.
    pub rate_micro: u64,
    pub burst: u32,
    pub reply: Reply,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub tick_ms: u32,
    pub max_keys: u32,
    pub breakers: Vec<BreakerRule>,
    pub limits: Vec<LimitRule>,
}

impl Default for Config {
    fn default() -> Self {
        Config { tick_ms: 100, max_keys: 1024, breakers: Vec::new(), limits: Vec::new() }
    }
}

enum Section {
    None,
    Filter,
    Breaker(BreakerRule),
    Limit(LimitRule),
}

fn err<T>(line: usize, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError { line, reason: reason.into() })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.')
}

fn valid_header_value(s: &str) -> bool {
    s.len() <= 1024 && s.bytes().all(|b| b != b'\r' && b != b'\n' && b != 0)
}

/// Parses a non-negative decimal with up to six fractional digits into millionths.
fn parse_micro(s: &str) -> Option<u64> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() || int.len() > 12 || frac.len() > 6 {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.contains('.') && frac.is_empty() {
        return None;
    }
    let i: u64 = int.parse().ok()?;
    let mut f: u64 = 0;
    for (n, b) in frac.bytes().enumerate() {
        f += (b - b'0') as u64 * 10u64.pow(5 - n as u32);
    }
    i.checked_mul(1_000_000)?.checked_add(f)
}

fn parse_u32(line: usize, key: &str, v: &str, lo: u32, hi: u32) -> Result<u32, ConfigError> {
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return err(line, format!("{}: expected an integer, got {:?}", key, v));
    }
    match v.parse::<u64>() {
        Ok(n) if n >= lo as u64 && n <= hi as u64 => Ok(n as u32),
        _ => err(line, format!("{}: expected {}..={}, got {}", key, lo, hi, v)),
    }
}

/// Durations: a number and a unit (`ms`, `s`, `m`, `h`), e.g. `250ms`, `1.5s`; `0` alone is zero.
pub fn parse_duration_ns(v: &str) -> Option<u64> {
    if v == "0" {
        return Some(0);
    }
    let (num, unit_ns) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1_000_000u64)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1_000_000_000)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60_000_000_000)
    } else if let Some(n) = v.strip_suffix('h') {
        (n, 3_600_000_000_000)
    } else {
        return None;
    };
    let micro = parse_micro(num)? as u128;
    let ns = micro * unit_ns as u128 / 1_000_000;
    if ns > 24 * 3_600_000_000_000 {
        return None;
    }
    Some(ns as u64)
}

/// Percentages: `50`, `50%`, `12.5` → basis points; must be in 0..=100.
fn parse_percent_bp(v: &str) -> Option<u32> {
    let v = v.strip_suffix('%').unwrap_or(v).trim_end();
    let micro = parse_micro(v)?;
    if micro > 100_000_000 || micro % 10_000 != 0 {
        return None;
    }
    Some((micro / 10_000) as u32)
}

/// Rates: `100/s`, `6000/m`, `10/h` or a bare number (per second).
fn parse_rate_micro(v: &str) -> Option<u64> {
    let (num, unit_s) = match v.split_once('/') {
        Some((n, "s")) => (n.trim(), 1u64),
        Some((n, "m")) => (n.trim(), 60),
        Some((n, "h")) => (n.trim(), 3600),
        Some(_) => return None,
        None => (v, 1),
    };
    let micro = parse_micro(num)?;
    let per_s = micro / unit_s;
    if per_s == 0 || per_s > 1_000_000 * 1_000_000 {
        return None;
    }
    Some(per_s)
}

fn parse_status_list(v: &str) -> Option<Vec<(u16, u16)>> {
    let mut out = Vec::new();
    for part in v.split(',') {
        let part = part.trim();
        let code = |s: &str| -> Option<u16> {
            if s.len() != 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n: u16 = s.parse().ok()?;
            if (100..=599).contains(&n) {
                Some(n)
            } else {
                None
            }
        };
        let range = if part.len() == 3 && part.ends_with("xx") {
            let d = part.as_bytes()[0];
            if !(b'1'..=b'5').contains(&d) {
                return None;
            }
            let base = (d - b'0') as u16 * 100;
            (base, base + 99)
        } else if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (code(a.trim())?, code(b.trim())?);
            if a > b {
                return None;
            }
            (a, b)
        } else {
            let c = code(part)?;
            (c, c)
        };
        out.push(range);
        if out.len() > 32 {
            return None;
        }
    }
    Some(out)
}

fn parse_path_template(v: &str) -> Option<Vec<PathSeg>> {
    let rest = v.strip_prefix('/')?;
    if v.len() > 512 {
        return None;
    }
    let mut out = Vec::new();
    let parts: Vec<&str> = rest.split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        let seg = if *p == "**" {
            if i + 1 != parts.len() {
                return None;
            }
            PathSeg::Rest
        } else if *p == "*" || (p.len() > 2 && p.starts_with('{') && p.ends_with('}')) {
            PathSeg::One
        } else if p.bytes().any(|b| b == b'*' || b == b'{' || b == b'}' || b == b'?' || b <= b' ') {
            return None;
        } else {
            PathSeg::Lit((*p).to_string())
        };
        out.push(seg);
    }
    Some(out)
}

/// Unescapes `\n`, `\t` and `\\` in reply bodies.
fn unescape(v: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(v.len());
    let mut it = v.bytes();
    while let Some(b) = it.next() {
        if b == b'\\' {
            match it.next()? {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'\\' => out.push(b'\\'),
                _ => return None,
            }
        } else {
            out.push(b);
        }
    }
    Some(out)
}

fn new_breaker(name: String) -> BreakerRule {
    BreakerRule {
        name,
        matcher: Match::default(),
        per: BreakerPer::Service,
        window: WindowKind::Count,
        window_size: 100,
        min_calls: 10,
        failure_rate_bp: 5000,
        failure_status: vec![(500, 599)],
        slow_call_ns: 0,
        slow_call_rate_bp: 10000,
        open_wait_ns: 30_000_000_000,
        half_open_calls: 3,
        reply: Reply { status: 503, body: b"circuit open\n".to_vec(), headers: Vec::new() },
    }
}

fn new_limit(name: String) -> LimitRule {
    LimitRule {
        name,
        matcher: Match::default(),
        key: LimitKey::Rule,
        rate_micro: 0,
        burst: 0,
        reply: Reply { status: 429, body: b"rate limited\n".to_vec(), headers: Vec::new() },
    }
}

/// Keys shared by both rule kinds: matchers and the reply.
fn common_key(
    line: usize,
    key: &str,
    v: &str,
    m: &mut Match,
    reply: &mut Reply,
) -> Result<bool, ConfigError> {
    match key {
        "match.cluster" | "match.route" => {
            if v.is_empty() || v.len() > 256 {
                return err(line, format!("{}: expected 1..=256 characters", key));
            }
            if key == "match.cluster" {
                m.cluster = Some(v.to_string());
            } else {
                m.route = Some(v.to_string());
            }
        }
        "match.method" => {
            if v.is_empty() || v.len() > 32 || !v.bytes().all(|b| b.is_ascii_uppercase()) {
                return err(line, format!("match.method: expected an upper-case method, got {:?}", v));
            }
            m.method = Some(v.to_string());
        }
        "match.path" => match parse_path_template(v) {
            Some(t) => m.path = Some(t),
            None => return err(line, format!("match.path: expected a template like /orders/{{id}} or /api/**, got {:?}", v)),
        },
        "reply_status" => reply.status = parse_u32(line, key, v, 200, 599)?,
        "reply_body" => match unescape(v) {
            Some(b) if b.len() <= 4096 => reply.body = b,
            _ => return err(line, "reply_body: bad escape (use \\n, \\t, \\\\) or longer than 4096 bytes"),
        },
        "reply_header" => {
            let (n, hv) = match v.split_once(':') {
                Some((n, hv)) => (n.trim(), hv.trim()),
                None => return err(line, format!("reply_header: expected 'name: value', got {:?}", v)),
            };
            if !valid_header_name(n) || n.starts_with(':') {
                return err(line, format!("reply_header: bad header name {:?} (lower-case token expected)", n));
            }
            if !valid_header_value(hv) {
                return err(line, "reply_header: value has control characters or is too long");
            }
            if reply.headers.len() >= 16 {
                return err(line, "reply_header: at most 16 headers");
            }
            reply.headers.push((n.to_string(), hv.to_string()));
        }
        _ => return Ok(false),
    }
    Ok(true)
}

fn breaker_key(line: usize, key: &str, v: &str, r: &mut BreakerRule) -> Result<(), ConfigError> {
    if common_key(line, key, v, &mut r.matcher, &mut r.reply)? {
        return Ok(());
    }
    match key {
        "per" => {
            r.per = match v {
                "service" => BreakerPer::Service,
                "route" => BreakerPer::Route,
                "rule" => BreakerPer::Rule,
                _ => return err(line, format!("per: expected service, route or rule, got {:?}", v)),
            }
        }
        "window" => {
            r.window = match v {
                "count" => WindowKind::Count,
                "time" => WindowKind::Time,
                _ => return err(line, format!("window: expected count or time, got {:?}", v)),
            }
        }
        "window_size" => r.window_size = parse_u32(line, key, v, 1, MAX_COUNT_WINDOW)?,
        "min_calls" => r.min_calls = parse_u32(line, key, v, 1, 1_000_000)?,
        "failure_rate" => match parse_percent_bp(v) {
            Some(bp) if bp > 0 => r.failure_rate_bp = bp,
            _ => return err(line, format!("failure_rate: expected a percentage in (0, 100], got {:?}", v)),
        },
        "failure_status" => match parse_status_list(v) {
            Some(l) => r.failure_status = l,
            None => return err(line, format!("failure_status: expected codes, ranges or classes like 500-599, 429, 5xx; got {:?}", v)),
        },
        "slow_call_duration" => match parse_duration_ns(v) {
            Some(ns) => r.slow_call_ns = ns,
            None => return err(line, format!("slow_call_duration: expected a duration like 500ms or 2s, got {:?}", v)),
        },
        "slow_call_rate" => match parse_percent_bp(v) {
            Some(bp) if bp > 0 => r.slow_call_rate_bp = bp,
            _ => return err(line, format!("slow_call_rate: expected a percentage in (0, 100], got {:?}", v)),
        },
        "open_wait" => match parse_duration_ns(v) {
            Some(ns) if ns >= 1_000_000 => r.open_wait_ns = ns,
            _ => return err(line, format!("open_wait: expected a duration of at least 1ms, got {:?}", v)),
        },
        "half_open_calls" => r.half_open_calls = parse_u32(line, key, v, 1, 1000)?,
        _ => return err(line, format!("unknown key {:?} in a [breaker] section", key)),
    }
    Ok(())
}

fn limit_key(line: usize, key: &str, v: &str, r: &mut LimitRule) -> Result<(), ConfigError> {
    if common_key(line, key, v, &mut r.matcher, &mut r.reply)? {
        return Ok(());
    }
    match key {
        "key" => {
            r.key = match v {
                "service" => LimitKey::Service,
                "route" => LimitKey::Route,
                "caller" => LimitKey::Caller,
                "rule" => LimitKey::Rule,
                _ => match v.strip_prefix("header:") {
                    Some(h) if valid_header_name(h.trim()) => LimitKey::Header(h.trim().to_string()),
                    _ => {
                        return err(
                            line,
                            format!("key: expected service, route, caller, rule or header:<name>, got {:?}", v),
                        )
                    }
                },
            }
        }
        "rate" => match parse_rate_micro(v) {
            Some(r2) => r.rate_micro = r2,
            None => return err(line, format!("rate: expected a positive rate like 100/s, 6000/m or 0.5/s, got {:?}", v)),
        },
        "burst" => r.burst = parse_u32(line, key, v, 1, 100_000_000)?,
        _ => return err(line, format!("unknown key {:?} in a [ratelimit] section", key)),
    }
    Ok(())
}

fn close_section(line: usize, sec: Section, cfg: &mut Config) -> Result<(), ConfigError> {
    match sec {
        Section::None | Section::Filter => {}
        Section::Breaker(r) => {
            if r.window == WindowKind::Time && r.window_size > MAX_TIME_WINDOW_S {
                return err(line, format!("breaker {}: a time window is at most {} seconds", r.name, MAX_TIME_WINDOW_S));
            }
            if r.window == WindowKind::Count && r.min_calls > r.window_size {
                return err(
                    line,
                    format!("breaker {}: min_calls ({}) exceeds the count window ({}), it could never open", r.name, r.min_calls, r.window_size),
                );
            }
            if cfg.breakers.iter().any(|b| b.name == r.name) {
                return err(line, format!("breaker {}: duplicate rule name", r.name));
            }
            cfg.breakers.push(r);
        }
        Section::Limit(r) => {
            if r.rate_micro == 0 {
                return err(line, format!("ratelimit {}: rate is required", r.name));
            }
            if r.burst == 0 {
                return err(line, format!("ratelimit {}: burst is required", r.name));
            }
            if cfg.limits.iter().any(|b| b.name == r.name) {
                return err(line, format!("ratelimit {}: duplicate rule name", r.name));
            }
            cfg.limits.push(r);
        }
    }
    if cfg.breakers.len() > MAX_RULES || cfg.limits.len() > MAX_RULES {
        return err(line, format!("at most {} rules of each kind", MAX_RULES));
    }
    Ok(())
}

/// Parses a whole document. The empty document is valid and configures a filter that does nothing.
pub fn parse(input: &[u8]) -> Result<Config, ConfigError> {
    if input.len() > MAX_CONFIG_BYTES {
        return err(0, format!("document is {} bytes, at most {} allowed", input.len(), MAX_CONFIG_BYTES));
    }
    let text = match std::str::from_utf8(input) {
        Ok(t) => t,
        Err(e) => return err(0, format!("not UTF-8 (at byte {})", e.valid_up_to())),
    };
    let mut cfg = Config::default();
    let mut sec = Section::None;
    let mut seen: Vec<String> = Vec::new();
    let mut saw_filter = false;
    let mut last_line = 0;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        last_line = n;
        if raw.len() > MAX_LINE_BYTES {
            return err(n, format!("line longer than {} bytes", MAX_LINE_BYTES));
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_prefix('[') {
            let head = match head.strip_suffix(']') {
                Some(h) => h.trim(),
                None => return err(n, "section header must end with ']'"),
            };
            let prev = std::mem::replace(&mut sec, Section::None);
            close_section(n, prev, &mut cfg)?;
            seen.clear();
            let (kind, name) = match head.split_once(char::is_whitespace) {
                Some((k, nm)) => (k, Some(nm.trim())),
                None => (head, None),
            };
            sec = match (kind, name) {
                ("filter", None) => {
                    if saw_filter {
                        return err(n, "[filter] given twice");
                    }
                    saw_filter = true;
                    Section::Filter
                }
                ("breaker", Some(nm)) | ("ratelimit", Some(nm)) => {
                    if !valid_name(nm) {
                        return err(n, format!("rule name {:?}: 1..=64 of A-Z a-z 0-9 - _ .", nm));
                    }
                    if kind == "breaker" {
                        Section::Breaker(new_breaker(nm.to_string()))
                    } else {
                        Section::Limit(new_limit(nm.to_string()))
                    }
                }
                ("breaker", None) | ("ratelimit", None) => return err(n, format!("[{}] needs a rule name: [{} <name>]", kind, kind)),
                _ => return err(n, format!("unknown section [{}]; expected [filter], [breaker <name>] or [ratelimit <name>]", head)),
            };
            continue;
        }
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => return err(n, format!("expected 'key = value', got {:?}", line)),
        };
        if key != "reply_header" {
            if seen.iter().any(|s| s == key) {
                return err(n, format!("{} given twice in one section", key));
            }
            seen.push(key.to_string());
        }
        match &mut sec {
            Section::None => return err(n, format!("{} outside a section", key)),
            Section::Filter => match key {
                "version" => {
                    if value != "1" {
                        return err(n, format!("version: only 1 is supported, got {:?}", value));
                    }
                }
                "tick_ms" => cfg.tick_ms = parse_u32(n, key, value, 10, 10_000)?,
                "max_keys" => cfg.max_keys = parse_u32(n, key, value, 1, 100_000)?,
                _ => return err(n, format!("unknown key {:?} in [filter]", key)),
            },
            Section::Breaker(r) => breaker_key(n, key, value, r)?,
            Section::Limit(r) => limit_key(n, key, value, r)?,
        }
    }
    close_section(last_line, sec, &mut cfg)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "\
# a full document
[filter]
version = 1
tick_ms = 50
max_keys = 16

[breaker orders]
match.cluster = orders
match.method = GET
match.path = /orders/{id}/**
per = route
window = time
window_size = 30
min_calls = 5
failure_rate = 50%
failure_status = 5xx, 429, 400-401
slow_call_duration = 1.5s
slow_call_rate = 80
open_wait = 2s
half_open_calls = 2
reply_status = 503
reply_body = open\\n
reply_header = x-a: 1
reply_header = x-b: two words

[ratelimit callers]
key = header:x-user
rate = 6000/m
burst = 20
";

    #[test]
    fn parses_full_document() {
        let c = parse(FULL.as_bytes()).expect("valid");
        assert_eq!(c.tick_ms, 50);
        assert_eq!(c.max_keys, 16);
        let b = &c.breakers[0];
        assert_eq!(b.per, BreakerPer::Route);
        assert_eq!(b.window, WindowKind::Time);
        assert_eq!((b.window_size, b.min_calls, b.failure_rate_bp), (30, 5, 5000));
        assert_eq!(b.failure_status, vec![(500, 599), (429, 429), (400, 401)]);
        assert_eq!(b.slow_call_ns, 1_500_000_000);
        assert_eq!(b.slow_call_rate_bp, 8000);
        assert_eq!(b.open_wait_ns, 2_000_000_000);
        assert_eq!(b.reply.body, b"open\n".to_vec());
        assert_eq!(b.reply.headers, vec![("x-a".into(), "1".into()), ("x-b".into(), "two words".into())]);
        let l = &c.limits[0];
        assert_eq!(l.key, LimitKey::Header("x-user".into()));
        assert_eq!(l.rate_micro, 100_000_000, "6000/m is 100/s");
        assert_eq!(l.burst, 20);
        assert_eq!(l.reply.status, 429);
    }

    #[test]
    fn empty_document_is_a_passthrough() {
        let c = parse(b"").expect("valid");
        assert!(c.breakers.is_empty() && c.limits.is_empty());
    }

    #[test]
    fn errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("[breaker a]\nwindow = sideways\n", 2, "window"),
            ("[breaker a]\nmin_calls = 200\nwindow_size = 10\n", 3, "min_calls"),
            ("[ratelimit a]\nburst = 1\n", 2, "rate is required"),
            ("[ratelimit a]\nrate = 0/s\nburst=1\n", 2, "rate"),
            ("x = 1\n", 1, "outside a section"),
            ("[breaker a]\nper = service\nper = route\n", 3, "twice"),
            ("[nope]\n", 1, "unknown section"),
            ("[breaker a]\n[breaker a]\n", 2, "duplicate"),
            ("[breaker a]\nfailure_status = 600\n", 2, "failure_status"),
            ("[breaker a]\nmatch.path = /a/**/b\n", 2, "match.path"),
            ("[breaker a]\nreply_header = X-Up: 1\n", 2, "reply_header"),
            ("[breaker a]\nopen_wait = 10\n", 2, "open_wait"),
            ("[filter]\ntick_ms = 5\n", 2, "tick_ms"),
            ("[breaker a]\nwindow = time\nwindow_size = 601\n", 3, "time window"),
        ];
        for (doc, line, word) in cases {
            match parse(doc.as_bytes()) {
                Ok(c) => panic!("expected an error for {:?}, got {:?}", doc, c),
                Err(e) => {
                    assert_eq!(e.line, *line, "expected line {} for {:?}, got {}", line, doc, e);
                    assert!(e.reason.contains(word), "expected {:?} in the reason, got {:?}", word, e.reason);
                }
            }
        }
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration_ns("250ms"), Some(250_000_000));
        assert_eq!(parse_duration_ns("1m"), Some(60_000_000_000));
        assert_eq!(parse_duration_ns("0.5s"), Some(500_000_000));
        assert_eq!(parse_duration_ns("5"), None);
        assert_eq!(parse_duration_ns("-1s"), None);
        assert_eq!(parse_duration_ns("25h"), None);
        assert_eq!(parse_rate_micro("0.5/s"), Some(500_000));
        assert_eq!(parse_rate_micro("60/h"), Some(16_666));
        assert_eq!(parse_rate_micro("10/d"), None);
        assert_eq!(parse_percent_bp("12.5%"), Some(1250));
        assert_eq!(parse_percent_bp("101"), None);
    }

    #[test]
    fn path_templates() {
        let m = |t: &str| Match { path: parse_path_template(t), ..Match::default() };
        assert!(m("/orders/{id}").path_matches(b"/orders/7?x=1"));
        assert!(!m("/orders/{id}").path_matches(b"/orders/7/items"));
        assert!(!m("/orders/{id}").path_matches(b"/orders/"));
        assert!(m("/orders/**").path_matches(b"/orders"));
        assert!(m("/orders/**").path_matches(b"/orders/1/2/3"));
        assert!(!m("/orders/**").path_matches(b"/order"));
        assert!(m("/").path_matches(b"/"));
    }

    /// xorshift64*: a deterministic generator so the fuzz loop is reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const TOKENS: &[&str] = &[
        "[", "]", "=", "\n", "#", " ", "[breaker x]", "[ratelimit y]", "[filter]", "rate", "burst", "100/s", "0",
        "-1", "99999999999999999999", "ms", "s", "%", ".", "/", "**", "{id}", "key = header:", "reply_header = a:b",
        "\\", "\\n", "\u{0}", "\u{feff}", "window = time", "window_size = 600", "min_calls", "5xx", "-", ",",
    ];

    #[test]
    fn fuzz_mutations_never_panic() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let seeds: Vec<Vec<u8>> = vec![FULL.as_bytes().to_vec(), b"[ratelimit a]\nrate=1/s\nburst=1\n".to_vec()];
        let mut accepted = 0;
        for round in 0..20_000 {
            let mut doc = seeds[round % seeds.len()].clone();
            for _ in 0..1 + rng.below(6) {
                let at = if doc.is_empty() { 0 } else { rng.below(doc.len() + 1) };
                match rng.below(5) {
                    0 if !doc.is_empty() && at < doc.len() => {
                        doc.remove(at);
                    }
                    1 if at < doc.len() => doc[at] = rng.next() as u8,
                    2 => {
                        let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                        doc.splice(at..at, t.iter().copied());
                    }
                    3 if at < doc.len() => {
                        let end = (at + rng.below(40)).min(doc.len());
                        doc.drain(at..end);
                    }
                    _ => {
                        let end = (at + rng.below(40)).min(doc.len());
                        let chunk: Vec<u8> = doc[at..end].to_vec();
                        doc.splice(at..at, chunk);
                    }
                }
            }
            match parse(&doc) {
                Ok(c) => {
                    accepted += 1;
                    for b in &c.breakers {
                        assert!(b.min_calls >= 1 && b.half_open_calls >= 1 && b.window_size >= 1);
                        assert!(b.failure_rate_bp >= 1 && b.failure_rate_bp <= 10_000);
                    }
                    for l in &c.limits {
                        assert!(l.rate_micro > 0 && l.burst > 0, "accepted a limit without rate/burst: {:?}", l);
                    }
                }
                Err(e) => assert!(!e.reason.is_empty()),
            }
        }
        assert!(accepted > 100, "expected some mutations to stay valid, got {}", accepted);
    }

    #[test]
    fn fuzz_random_bytes_never_panic() {
        let mut rng = Rng(42);
        for _ in 0..20_000 {
            let len = rng.below(200);
            let doc: Vec<u8> = (0..len).map(|_| TOKENS[rng.below(TOKENS.len())].as_bytes()[0] ^ (rng.next() as u8 & 1)).collect();
            let _ = parse(&doc);
        }
    }
}
