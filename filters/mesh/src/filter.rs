//! The proxy-wasm glue: Envoy's callbacks in, decisions from [`crate::breaker`] and
//! [`crate::ratelimit`] out.
//!
//! Per request it reads only what the configured rules need (route and cluster properties, method,
//! path, the caller or a key header), spends a leased rate-limit token or checks the cached breaker
//! state, and on the response notes the outcome locally. Host calls that touch shared data happen on
//! the timer tick (folding outcomes, giving back idle leases, reading the state other workers wrote),
//! when a lease runs out, on the rare breaker transitions, and when a failure may trip a breaker.
//! Anything the host fails to give us fails open: the request passes and the filter keeps running.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use meshpilot_abi::{action, buffer, encode_pairs, host, level, map, metric, status};

use crate::breaker::{self, Admit, Local, Outcome, Shared};
use crate::config::{self, BreakerPer, Config, LimitKey, Match, Reply};
use crate::keys;
use crate::ratelimit::{self, Bucket, Lease, Quick};

const CAS_TRIES: usize = 16;
/// Targets used within this long are refreshed from shared data on every tick.
const ACTIVE_NS: u64 = 10_000_000_000;

/// FNV-1a: keys are short strings and SipHash's DoS resistance buys nothing for a bounded map.
#[derive(Default)]
struct Fnv(u64);
impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}
type Map<V> = HashMap<String, V, BuildHasherDefault<Fnv>>;
type IdMap<V> = HashMap<u32, V, BuildHasherDefault<Fnv>>;

struct Target {
    shared_key: String,
    local: Local,
    metrics: Option<(u32, u32, u32)>, // state gauge, rejected counter, opened counter
    rejected: u64,
    opened: u64,
    reported_state: u8,
    last_used_ns: u64,
}

struct LimitEntry {
    shared_key: String,
    lease: Lease,
    metrics: Option<(u32, u32, u32)>, // allowed counter, rejected counter, tokens gauge
    reported_tokens: u64,
    last_used_ns: u64,
}

/// The targets or buckets of one rule: a name index into a vector, so a request keeps a plain index.
struct RuleKeys<T> {
    index: Map<usize>,
    items: Vec<T>,
    full: bool,
}

impl<T> RuleKeys<T> {
    fn new() -> Self {
        RuleKeys { index: Map::default(), items: Vec::new(), full: false }
    }
}

struct Root {
    cfg: Rc<Config>,
    /// Bumped on every configuration, so a request admitted under an older one is not misattributed.
    epoch: u64,
    breakers: Vec<RuleKeys<Target>>,
    limits: Vec<RuleKeys<LimitEntry>>,
    now_ns: u64,
}

struct Tracked {
    epoch: u64,
    rule: usize,
    target: usize,
    probe: Option<u32>,
    start_ns: u64,
    responded: bool,
}

struct Http {
    root: u32,
    tracked: Option<Tracked>,
}

thread_local! {
    static ROOTS: RefCell<IdMap<Root>> = RefCell::new(IdMap::default());
    static HTTP: RefCell<IdMap<Http>> = RefCell::new(IdMap::default());
}

fn log(lvl: u32, msg: &str) {
    host::log(lvl, msg);
}

// ---------------------------------------------------------------- request fields, read lazily

#[derive(Default)]
struct Req {
    cluster: Option<Option<String>>,
    route: Option<Option<String>>,
    method: Option<Option<String>>,
    path: Option<Option<Vec<u8>>>,
}

/// The first non-empty property among `paths`. Only the `xds.*` names: Envoy 1.40 no longer answers the
/// old top-level `route_name`, and every miss would cost a host call per request.
fn prop_string(paths: &[&[u8]]) -> Option<String> {
    for p in paths {
        if let Some(b) = host::property(p) {
            if !b.bytes().is_empty() {
                return Some(keys::value(b.bytes()));
            }
        }
    }
    None
}

impl Req {
    fn cluster(&mut self) -> Option<&str> {
        self.cluster
            .get_or_insert_with(|| prop_string(&[b"xds\0cluster_name"]))
            .as_deref()
    }
    fn route(&mut self) -> Option<&str> {
        self.route.get_or_insert_with(|| prop_string(&[b"xds\0route_name"])).as_deref()
    }
    fn method(&mut self) -> Option<&str> {
        self.method
            .get_or_insert_with(|| host::header(map::REQUEST_HEADERS, ":method").map(|b| keys::value(b.bytes())))
            .as_deref()
    }
    fn path(&mut self) -> Option<&[u8]> {
        self.path
            .get_or_insert_with(|| host::header(map::REQUEST_HEADERS, ":path").map(|b| b.bytes().to_vec()))
            .as_deref()
    }
    fn matches(&mut self, m: &Match) -> bool {
        if let Some(c) = &m.cluster {
            if self.cluster() != Some(c.as_str()) {
                return false;
            }
        }
        if let Some(r) = &m.route {
            if self.route() != Some(r.as_str()) {
                return false;
            }
        }
        if let Some(x) = &m.method {
            if self.method() != Some(x.as_str()) {
                return false;
            }
        }
        if m.path.is_some() {
            let ok = match self.path() {
                Some(p) => m.path_matches(p),
                None => false,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

fn header_value(name: &str) -> String {
    match host::header(map::REQUEST_HEADERS, name) {
        Some(b) => keys::value(b.bytes()),
        None => keys::MISSING.to_string(),
    }
}

// ---------------------------------------------------------------- shared data

/// Reads, changes and compare-and-swaps one record. `f` returns a result and whether it changed the
/// record. `None` when the host refuses or the CAS keeps losing: callers fail open.
fn cas_update<T, R>(
    key: &str,
    decode: impl Fn(Option<&[u8]>) -> T,
    encode: impl Fn(&T) -> Vec<u8>,
    mut f: impl FnMut(&mut T) -> (R, bool),
) -> Option<(R, T)> {
    for _ in 0..CAS_TRIES {
        let (mut rec, cas) = match host::shared_get(key) {
            Ok(Some((b, cas))) => (decode(Some(b.bytes())), cas),
            Ok(None) => (decode(None), 0),
            Err(_) => return None,
        };
        let (r, changed) = f(&mut rec);
        if !changed {
            return Some((r, rec));
        }
        match host::shared_set(key, &encode(&rec), cas) {
            Ok(()) => return Some((r, rec)),
            Err(status::CAS_MISMATCH) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Claims a slot for a new key in the rule's bounded key space. True if the key already exists in
/// shared data or a slot was free.
fn claim_key(kind: &str, rule: &str, shared_key: &str, max_keys: u32, full: &mut bool) -> bool {
    if let Ok(Some(_)) = host::shared_get(shared_key) {
        return true;
    }
    if *full {
        return false;
    }
    let counter = keys::key_count_key(kind, rule);
    let res = cas_update(
        &counter,
        |b| b.and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).unwrap_or(0),
        |n| n.to_le_bytes().to_vec(),
        |n| {
            if *n >= max_keys {
                (false, false)
            } else {
                *n += 1;
                (true, true)
            }
        },
    );
    match res {
        Some((true, _)) => true,
        Some((false, _)) => {
            *full = true;
            false
        }
        None => false,
    }
}

fn define(kind: u32, name: &str) -> Option<u32> {
    host::define_metric(kind, name)
}

// ---------------------------------------------------------------- breaker

/// The index of a breaker target, creating it (within the rule's key budget) on first sight.
fn breaker_target(root_cfg: &Config, set: &mut RuleKeys<Target>, rule: &config::BreakerRule, target: &str, now_ns: u64) -> usize {
    if let Some(&i) = set.index.get(target) {
        return i;
    }
    let shared_key = keys::breaker_key(&rule.name, target);
    let name = if claim_key("cb", &rule.name, &shared_key, root_cfg.max_keys, &mut set.full) { target } else { keys::OVERFLOW };
    if let Some(&i) = set.index.get(name) {
        return i;
    }
    let shared_key = keys::breaker_key(&rule.name, name);
    let mut local = Local::new(rule);
    if let Ok(Some((b, _))) = host::shared_get(&shared_key) {
        local.sync(&Shared::decode(rule, b.bytes()), now_ns);
    }
    let stat = format!("meshpilot.breaker.{}.{}", keys::stat_segment(&rule.name), keys::stat_segment(name));
    let metrics = match (
        define(metric::GAUGE, &format!("{}.state", stat)),
        define(metric::COUNTER, &format!("{}.rejected", stat)),
        define(metric::COUNTER, &format!("{}.opened", stat)),
    ) {
        (Some(a), Some(b), Some(c)) => Some((a, b, c)),
        _ => None,
    };
    set.items.push(Target { shared_key, local, metrics, rejected: 0, opened: 0, reported_state: 255, last_used_ns: now_ns });
    let i = set.items.len() - 1;
    set.index.insert(name.to_string(), i);
    i
}

fn shared_breaker(rule: &config::BreakerRule, key: &str, f: impl FnMut(&mut Shared) -> (u8, bool)) -> Option<(u8, Shared)> {
    cas_update(key, |b| b.map(|b| Shared::decode(rule, b)).unwrap_or_else(|| Shared::new(rule)), |s| s.encode(), f)
}

fn fold_target(rule: &config::BreakerRule, t: &mut Target, now_ns: u64) {
    let (pending, gen) = t.local.take_pending(rule);
    if let Some((before, s)) = shared_breaker(rule, &t.shared_key, |s| {
        let before = s.state;
        (before, s.fold(rule, &pending, gen, now_ns))
    }) {
        if before == breaker::CLOSED && s.state == breaker::OPEN {
            t.opened += 1;
            log(level::INFO, &format!("meshpilot breaker {}: {} opened", rule.name, t.shared_key));
        }
        t.local.sync(&s, now_ns);
    }
}

fn refresh_target(rule: &config::BreakerRule, t: &mut Target, now_ns: u64) {
    if let Ok(Some((b, _))) = host::shared_get(&t.shared_key) {
        t.local.sync(&Shared::decode(rule, b.bytes()), now_ns);
    }
}

// ---------------------------------------------------------------- decisions

enum Decision {
    Continue,
    Reply { status: u32, details: &'static str, body: Vec<u8>, headers: Vec<(String, String)> },
}

fn reply(r: &Reply, details: &'static str, extra: Vec<(String, String)>) -> Decision {
    let mut headers = r.headers.clone();
    headers.extend(extra);
    Decision::Reply { status: r.status, details, body: r.body.clone(), headers }
}

/// The index of a rate-limit bucket, creating it (within the rule's key budget) on first sight.
fn limit_entry(cfg: &Config, set: &mut RuleKeys<LimitEntry>, rule: &config::LimitRule, value: &str, now_ns: u64) -> usize {
    if let Some(&i) = set.index.get(value) {
        return i;
    }
    let shared_key = keys::limit_key(&rule.name, value);
    let name = if claim_key("rl", &rule.name, &shared_key, cfg.max_keys, &mut set.full) { value } else { keys::OVERFLOW };
    if let Some(&i) = set.index.get(name) {
        return i;
    }
    let stat = format!("meshpilot.ratelimit.{}.{}", keys::stat_segment(&rule.name), keys::stat_segment(name));
    let metrics = match (
        define(metric::COUNTER, &format!("{}.allowed", stat)),
        define(metric::COUNTER, &format!("{}.rejected", stat)),
        define(metric::GAUGE, &format!("{}.tokens", stat)),
    ) {
        (Some(a), Some(b), Some(c)) => Some((a, b, c)),
        _ => None,
    };
    let shared_key = keys::limit_key(&rule.name, name);
    set.items.push(LimitEntry { shared_key, lease: Lease::default(), metrics, reported_tokens: u64::MAX, last_used_ns: now_ns });
    let i = set.items.len() - 1;
    set.index.insert(name.to_string(), i);
    i
}

/// The host's time, read at most once per request.
fn clock(cache: &mut Option<u64>, root_now: &mut u64) -> u64 {
    *cache.get_or_insert_with(|| {
        let t = host::now_ns();
        *root_now = t;
        t
    })
}

fn on_request(root: &mut Root, http: &mut Http) -> Decision {
    let cfg = Rc::clone(&root.cfg);
    let mut req = Req::default();
    let mut now_cached: Option<u64> = None;

    for (i, rule) in cfg.limits.iter().enumerate() {
        if !req.matches(&rule.matcher) {
            continue;
        }
        let owned: String;
        let value: &str = match &rule.key {
            LimitKey::Rule => "all",
            LimitKey::Service => req.cluster().unwrap_or(keys::MISSING),
            LimitKey::Route => req.route().unwrap_or(keys::MISSING),
            LimitKey::Caller => {
                owned = header_value("x-mesh-caller");
                &owned
            }
            LimitKey::Header(h) => {
                owned = header_value(h);
                &owned
            }
        };
        let root_now = root.now_ns;
        let set = match root.limits.get_mut(i) {
            Some(s) => s,
            None => continue,
        };
        let idx = limit_entry(&cfg, set, rule, value, root_now);
        let e = match set.items.get_mut(idx) {
            Some(e) => e,
            None => continue,
        };
        let mut t_now = 0;
        let (q, _) = e.lease.quick(|| {
            t_now = host::now_ns();
            t_now
        });
        if t_now != 0 {
            root.now_ns = t_now;
            now_cached = Some(t_now);
        }
        match q {
            Quick::Allow => {}
            Quick::Reject { retry_after_ns } => {
                let ra = keys::retry_after_s(retry_after_ns).to_string();
                return reply(&rule.reply, "meshpilot_rate_limited", vec![("retry-after".into(), ra)]);
            }
            Quick::Refill => {
                let t = t_now;
                let want = ratelimit::lease_size(rule);
                let res = cas_update(
                    &e.shared_key,
                    |b| match b {
                        Some(b) => Bucket::decode(rule, b, t),
                        None => Bucket::new(rule, t),
                    },
                    |b| b.encode().to_vec(),
                    |b| {
                        b.refill(rule, t);
                        let taken = b.take(want);
                        (taken, true)
                    },
                );
                match res {
                    Some((taken, bucket)) => {
                        if !e.lease.refilled(rule, &bucket, taken, t) {
                            let ra = keys::retry_after_s(bucket.wait_ns(rule)).to_string();
                            return reply(&rule.reply, "meshpilot_rate_limited", vec![("retry-after".into(), ra)]);
                        }
                    }
                    None => {
                        // Shared data unavailable: fail open for this request.
                        e.lease.allowed += 1;
                    }
                }
            }
        }
        e.last_used_ns = root.now_ns;
    }

    let found = cfg.breakers.iter().enumerate().find(|(_, r)| req.matches(&r.matcher));
    let (i, rule) = match found {
        Some(x) => x,
        None => return Decision::Continue,
    };
    let target: &str = match rule.per {
        BreakerPer::Rule => "all",
        BreakerPer::Service => match req.cluster() {
            Some(c) => c,
            None => return Decision::Continue,
        },
        BreakerPer::Route => match req.route() {
            Some(r) => r,
            None => return Decision::Continue,
        },
    };
    let root_now = root.now_ns;
    let set = match root.breakers.get_mut(i) {
        Some(s) => s,
        None => return Decision::Continue,
    };
    let idx = breaker_target(&cfg, set, rule, target, root_now);
    let t = match set.items.get_mut(idx) {
        Some(t) => t,
        None => return Decision::Continue,
    };
    t.last_used_ns = root_now;
    let mut probe = None;
    if t.local.state != breaker::CLOSED {
        let n = clock(&mut now_cached, &mut root.now_ns);
        let admit = if t.local.state == breaker::OPEN && n < t.local.open_until_ns {
            Admit::Reject { half_open: false, retry_after_ns: t.local.open_until_ns - n }
        } else {
            match shared_breaker(rule, &t.shared_key, |s| {
                let (a, changed) = s.admit(rule, n);
                (match a { Admit::Allow => 0, Admit::Probe(_) => 1, Admit::Reject { half_open: false, .. } => 2, _ => 3 }, changed)
            }) {
                Some((code, s)) => {
                    t.local.sync(&s, n);
                    match code {
                        0 => Admit::Allow,
                        1 => Admit::Probe(s.gen),
                        2 => Admit::Reject { half_open: false, retry_after_ns: s.open_until_ns.saturating_sub(n) },
                        _ => Admit::Reject { half_open: true, retry_after_ns: 0 },
                    }
                }
                None => Admit::Allow,
            }
        };
        match admit {
            Admit::Allow => {}
            Admit::Probe(g) => probe = Some(g),
            Admit::Reject { half_open, retry_after_ns } => {
                t.rejected += 1;
                let mut extra = vec![("x-mesh-circuit".to_string(), if half_open { "half-open" } else { "open" }.to_string())];
                if retry_after_ns > 0 {
                    extra.push(("retry-after".into(), keys::retry_after_s(retry_after_ns).to_string()));
                }
                return reply(&rule.reply, "meshpilot_circuit_open", extra);
            }
        }
    }
    let start_ns = if rule.slow_call_ns > 0 { slow_clock(rule, cfg.tick_ms, &mut now_cached, &mut root.now_ns) } else { 0 };
    http.tracked = Some(Tracked { epoch: root.epoch, rule: i, target: idx, probe, start_ns, responded: false });
    Decision::Continue
}

/// The clock for slow-call timing: the worker's tick clock when the threshold is at least 20 ticks
/// (an error of at most one tick, 5 %), which saves two host calls per request; the host clock otherwise.
fn slow_clock(rule: &config::BreakerRule, tick_ms: u32, cache: &mut Option<u64>, root_now: &mut u64) -> u64 {
    if rule.slow_call_ns >= 20 * tick_ms as u64 * 1_000_000 {
        *root_now
    } else {
        clock(cache, root_now)
    }
}

/// Notes a tracked request's outcome: a half-open probe reports at once, a closed-state call is kept
/// locally (and folded at once only if it may trip the breaker).
fn on_outcome(root: &mut Root, tr: &Tracked, status_failure: Option<bool>) {
    if tr.epoch != root.epoch {
        return;
    }
    let cfg = Rc::clone(&root.cfg);
    let rule = match cfg.breakers.get(tr.rule) {
        Some(r) => r,
        None => return,
    };
    let failure = status_failure.unwrap_or(true);
    let mut cache = None;
    let now_ns = if tr.probe.is_some() {
        clock(&mut cache, &mut root.now_ns)
    } else if rule.slow_call_ns > 0 {
        slow_clock(rule, cfg.tick_ms, &mut cache, &mut root.now_ns)
    } else {
        root.now_ns
    };
    let slow = rule.slow_call_ns > 0 && tr.start_ns > 0 && now_ns.saturating_sub(tr.start_ns) >= rule.slow_call_ns;
    let o = Outcome { failure, slow };
    let t = match root.breakers.get_mut(tr.rule).and_then(|s| s.items.get_mut(tr.target)) {
        Some(t) => t,
        None => return,
    };
    match tr.probe {
        Some(g) => {
            if let Some((before, s)) = shared_breaker(rule, &t.shared_key, |s| {
                let before = s.state;
                (before, s.probe_done(rule, g, o, now_ns))
            }) {
                if before == breaker::HALF_OPEN && s.state != breaker::HALF_OPEN {
                    let what = if s.state == breaker::OPEN { "re-opened" } else { "closed" };
                    if s.state == breaker::OPEN {
                        t.opened += 1;
                    }
                    log(level::INFO, &format!("meshpilot breaker {}: {} {}", rule.name, t.shared_key, what));
                }
                t.local.sync(&s, now_ns);
            }
        }
        None => {
            if let Some(now) = t.local.note(rule, o, now_ns, || clock(&mut cache, &mut root.now_ns)) {
                fold_target(rule, t, now);
            }
        }
    }
}

fn on_tick(root: &mut Root) {

    let now_ns = host::now_ns();
    if now_ns == 0 {
        return;
    }
    root.now_ns = now_ns;
    let cfg = Rc::clone(&root.cfg);
    for (rule, set) in cfg.breakers.iter().zip(root.breakers.iter_mut()) {
        for t in set.items.iter_mut() {
            if !t.local.pending.is_empty() {
                fold_target(rule, t, now_ns);
            } else if t.local.state != breaker::CLOSED || now_ns.saturating_sub(t.last_used_ns) < ACTIVE_NS {
                refresh_target(rule, t, now_ns);
            }
            if let Some((state, rejected, opened)) = t.metrics {
                if t.reported_state != t.local.state {
                    host::record_metric(state, t.local.state as u64);
                    t.reported_state = t.local.state;
                }
                if t.rejected > 0 {
                    host::increment_metric(rejected, t.rejected as i64);
                }
                if t.opened > 0 {
                    host::increment_metric(opened, t.opened as i64);
                }
            }
            t.rejected = 0;
            t.opened = 0;
        }
    }
    for (rule, set) in cfg.limits.iter().zip(root.limits.iter_mut()) {
        for e in set.items.iter_mut() {
            let back = e.lease.tick();
            if back > 0 {
                let res = cas_update(
                    &e.shared_key,
                    |b| match b {
                        Some(b) => Bucket::decode(rule, b, now_ns),
                        None => Bucket::new(rule, now_ns),
                    },
                    |b| b.encode().to_vec(),
                    |b| {
                        b.refill(rule, now_ns);
                        b.give_back(rule, back);
                        (b.whole_tokens(), true)
                    },
                );
                if let Some((tokens, _)) = res {
                    e.lease.last_seen_tokens = tokens;
                }
            }
            if let Some((allowed, rejected, tokens)) = e.metrics {
                if e.lease.allowed > 0 {
                    host::increment_metric(allowed, e.lease.allowed as i64);
                }
                if e.lease.rejected > 0 {
                    host::increment_metric(rejected, e.lease.rejected as i64);
                }
                if e.reported_tokens != e.lease.last_seen_tokens {
                    host::record_metric(tokens, e.lease.last_seen_tokens);
                    e.reported_tokens = e.lease.last_seen_tokens;
                }
            }
            e.lease.allowed = 0;
            e.lease.rejected = 0;
        }
    }
}

// ---------------------------------------------------------------- exports

meshpilot_abi::reactor_exports!();

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_id: u32) {
    if parent_id == 0 {
        ROOTS.with(|r| {
            if let Ok(mut roots) = r.try_borrow_mut() {
                roots.insert(
                    context_id,
                    Root { cfg: Rc::new(Config::default()), epoch: 0, breakers: Vec::new(), limits: Vec::new(), now_ns: 0 },
                );
            }
        });
    } else {
        HTTP.with(|h| {
            if let Ok(mut http) = h.try_borrow_mut() {
                http.insert(context_id, Http { root: parent_id, tracked: None });
            }
        });
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_id: u32, _size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root_id: u32, size: usize) -> u32 {
    let raw = if size == 0 { None } else { host::buffer(buffer::PLUGIN_CONFIGURATION, 0, size) };
    let bytes: &[u8] = match &raw {
        Some(b) => b.bytes(),
        None => &[],
    };
    let cfg = match config::parse(bytes) {
        Ok(c) => c,
        Err(e) => {
            log(level::ERROR, &format!("meshpilot filter: configuration rejected: {}", e));
            return 0;
        }
    };
    let summary = format!(
        "meshpilot filter: configured {} breaker rule(s), {} rate-limit rule(s), tick {} ms",
        cfg.breakers.len(),
        cfg.limits.len(),
        cfg.tick_ms
    );
    let tick = cfg.tick_ms;
    let ok = ROOTS.with(|r| match r.try_borrow_mut() {
        Ok(mut roots) => {
            let epoch = roots.get(&root_id).map_or(0, |r| r.epoch + 1);
            let root = Root {
                epoch,
                breakers: cfg.breakers.iter().map(|_| RuleKeys::new()).collect(),
                limits: cfg.limits.iter().map(|_| RuleKeys::new()).collect(),
                cfg: Rc::new(cfg),
                now_ns: host::now_ns(),
            };
            roots.insert(root_id, root);
            true
        }
        Err(_) => false,
    });
    if !ok {
        return 0;
    }
    host::set_tick_period_ms(tick);
    log(level::INFO, &summary);
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root_id: u32) {
    ROOTS.with(|r| {
        if let Ok(mut roots) = r.try_borrow_mut() {
            if let Some(root) = roots.get_mut(&root_id) {
                on_tick(root);
            }
        }
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    let decision = HTTP.with(|h| {
        let mut http_map = match h.try_borrow_mut() {
            Ok(m) => m,
            Err(_) => return Decision::Continue,
        };
        let http = match http_map.get_mut(&context_id) {
            Some(x) => x,
            None => return Decision::Continue,
        };
        ROOTS.with(|r| {
            let mut roots = match r.try_borrow_mut() {
                Ok(m) => m,
                Err(_) => return Decision::Continue,
            };
            match roots.get_mut(&http.root) {
                Some(root) if !(root.cfg.breakers.is_empty() && root.cfg.limits.is_empty()) => on_request(root, http),
                _ => Decision::Continue,
            }
        })
    });
    match decision {
        Decision::Continue => action::CONTINUE,
        Decision::Reply { status, details, body, headers } => {
            let pairs: Vec<(&[u8], &[u8])> = headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect();
            host::send_local_response(status, details, &body, &encode_pairs(&pairs));
            action::PAUSE
        }
    }
}

fn finish(context_id: u32, status_code: Option<u32>) {
    HTTP.with(|h| {
        let mut http_map = match h.try_borrow_mut() {
            Ok(m) => m,
            Err(_) => return,
        };
        let http = match http_map.get_mut(&context_id) {
            Some(x) => x,
            None => return,
        };
        let tr = match &mut http.tracked {
            Some(tr) if !tr.responded => tr,
            _ => return,
        };
        tr.responded = true;
        let root_id = http.root;
        ROOTS.with(|r| {
            let mut roots = match r.try_borrow_mut() {
                Ok(m) => m,
                Err(_) => return,
            };
            let root = match roots.get_mut(&root_id) {
                Some(x) => x,
                None => return,
            };
            let failure = match status_code {
                Some(code) => match root.cfg.breakers.get(tr.rule) {
                    Some(rule) => Some(code == 0 || rule.is_failure_status(code)),
                    None => return,
                },
                None => None,
            };
            on_outcome(root, tr, failure);
        });
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    let tracked = HTTP.with(|h| match h.try_borrow() {
        Ok(m) => matches!(m.get(&context_id), Some(Http { tracked: Some(t), .. }) if !t.responded),
        Err(_) => false,
    });
    if tracked {
        let code = host::header(map::RESPONSE_HEADERS, ":status").map(|b| keys::status(b.bytes())).unwrap_or(0);
        finish(context_id, Some(code));
    }
    action::CONTINUE
}


/// The stream is over. A tracked request that never saw response headers (an upstream reset, or a
/// client that gave up waiting) counts as a failure. There is no proxy_on_log / proxy_on_done export:
/// Envoy skips callbacks a module does not export, which saves two VM entries per request.
#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    finish(context_id, None);
    let was_http = HTTP.with(|h| match h.try_borrow_mut() {
        Ok(mut m) => m.remove(&context_id).is_some(),
        Err(_) => false,
    });
    if !was_http {
        ROOTS.with(|r| {
            if let Ok(mut roots) = r.try_borrow_mut() {
                roots.remove(&context_id);
            }
        });
    }
}
