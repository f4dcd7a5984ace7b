//! The circuit breaker's state machine, free of any host call.
//!
//! One breaker target (a service, a route, or a whole rule) has a [`Shared`] record that lives in
//! Envoy's shared data, so every worker of an Envoy sees the same state: closed / open / half-open, the
//! sliding window of outcomes (count- or time-based), the half-open permits and probe results. Workers
//! never write it per request: each keeps a [`Local`] view with the outcomes it saw since it last
//! folded them in ([`Shared::fold`], on the timer tick or at once when a failure may trip the breaker).
//! Only the rare paths (open → half-open, taking a half-open permit, reporting a probe) change the
//! record per request. The glue in `filter.rs` does the compare-and-swap loop around these functions.

use crate::config::{BreakerRule, WindowKind};

pub const CLOSED: u8 = 0;
pub const OPEN: u8 = 1;
pub const HALF_OPEN: u8 = 2;

const NS: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    pub failure: bool,
    pub slow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bucket {
    pub sec: u32,
    pub calls: u32,
    pub failures: u32,
    pub slow: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Window {
    /// The last `size` calls as two bit rings; `head` is the next slot to write.
    Count { size: u32, head: u32, len: u32, fail: Vec<u8>, slow: Vec<u8> },
    /// Per-second buckets, slot = second % size.
    Time { buckets: Vec<Bucket> },
}

fn bit(bits: &[u8], i: u32) -> bool {
    bits.get((i / 8) as usize).map_or(false, |b| b & (1 << (i % 8)) != 0)
}

fn set_bit(bits: &mut [u8], i: u32, on: bool) {
    if let Some(b) = bits.get_mut((i / 8) as usize) {
        if on {
            *b |= 1 << (i % 8);
        } else {
            *b &= !(1 << (i % 8));
        }
    }
}

impl Window {
    pub fn new(rule: &BreakerRule) -> Window {
        match rule.window {
            WindowKind::Count => {
                let bytes = ((rule.window_size + 7) / 8) as usize;
                Window::Count { size: rule.window_size, head: 0, len: 0, fail: vec![0; bytes], slow: vec![0; bytes] }
            }
            WindowKind::Time => Window::Time { buckets: vec![Bucket::default(); rule.window_size as usize] },
        }
    }

    fn fits(&self, rule: &BreakerRule) -> bool {
        match (self, rule.window) {
            (Window::Count { size, .. }, WindowKind::Count) => *size == rule.window_size,
            (Window::Time { buckets }, WindowKind::Time) => buckets.len() == rule.window_size as usize,
            _ => false,
        }
    }

    fn push_count(&mut self, o: Outcome) {
        if let Window::Count { size, head, len, fail, slow } = self {
            set_bit(fail, *head, o.failure);
            set_bit(slow, *head, o.slow);
            *head = (*head + 1) % *size;
            if *len < *size {
                *len += 1;
            }
        }
    }

    fn add_time(&mut self, b: Bucket) {
        if let Window::Time { buckets } = self {
            let n = buckets.len() as u32;
            if n == 0 {
                return;
            }
            let slot = &mut buckets[(b.sec % n) as usize];
            if slot.sec != b.sec {
                if slot.sec > b.sec {
                    return; // older than what the slot already holds: outside the window
                }
                *slot = Bucket { sec: b.sec, ..Bucket::default() };
            }
            slot.calls = slot.calls.saturating_add(b.calls);
            slot.failures = slot.failures.saturating_add(b.failures);
            slot.slow = slot.slow.saturating_add(b.slow);
        }
    }

    /// (calls, failures, slow) currently inside the window.
    pub fn totals(&self, now_sec: u32) -> (u32, u32, u32) {
        match self {
            Window::Count { size, head, len, fail, slow } => {
                let (mut f, mut s) = (0, 0);
                for k in 0..*len {
                    let i = (*head + *size - 1 - k) % *size;
                    f += bit(fail, i) as u32;
                    s += bit(slow, i) as u32;
                }
                (*len, f, s)
            }
            Window::Time { buckets } => {
                let n = buckets.len() as u32;
                let oldest = now_sec.saturating_sub(n.saturating_sub(1));
                let (mut c, mut f, mut s) = (0u32, 0u32, 0u32);
                for b in buckets {
                    if b.calls > 0 && b.sec >= oldest && b.sec <= now_sec {
                        c = c.saturating_add(b.calls);
                        f = f.saturating_add(b.failures);
                        s = s.saturating_add(b.slow);
                    }
                }
                (c, f, s)
            }
        }
    }
}

/// Outcomes a worker saw and has not folded into the shared record yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    Count(Vec<Outcome>),
    Time(Vec<Bucket>),
}

impl Pending {
    pub fn new(rule: &BreakerRule) -> Pending {
        match rule.window {
            WindowKind::Count => Pending::Count(Vec::new()),
            WindowKind::Time => Pending::Time(Vec::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            Pending::Count(v) => v.is_empty(),
            Pending::Time(v) => v.is_empty(),
        }
    }

    fn clear(&mut self) {
        match self {
            Pending::Count(v) => v.clear(),
            Pending::Time(v) => v.clear(),
        }
    }

    /// Adds one outcome; memory stays bounded by the window size.
    fn push(&mut self, rule: &BreakerRule, o: Outcome, sec: u32) {
        match self {
            Pending::Count(v) => {
                let size = rule.window_size as usize;
                if v.len() >= 2 * size {
                    v.drain(..size); // only the newest `size` can still matter
                }
                v.push(o);
            }
            Pending::Time(v) => {
                match v.last_mut() {
                    Some(b) if b.sec == sec => {
                        b.calls = b.calls.saturating_add(1);
                        b.failures = b.failures.saturating_add(o.failure as u32);
                        b.slow = b.slow.saturating_add(o.slow as u32);
                        return;
                    }
                    _ => {}
                }
                if v.len() > rule.window_size as usize {
                    v.remove(0);
                }
                v.push(Bucket { sec, calls: 1, failures: o.failure as u32, slow: o.slow as u32 });
            }
        }
    }
}

/// True when the rates in a window of `calls` calls trip the breaker.
pub fn trips(rule: &BreakerRule, min_calls: u32, calls: u32, failures: u32, slow: u32) -> bool {
    if calls == 0 || calls < min_calls {
        return false;
    }
    let c = calls as u64;
    let fail = failures as u64 * 10_000 >= rule.failure_rate_bp as u64 * c;
    let slow = rule.slow_call_ns > 0 && slow as u64 * 10_000 >= rule.slow_call_rate_bp as u64 * c;
    fail || slow
}

/// What to do with a request, decided against the shared record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Allow,
    /// A half-open probe; its outcome must be reported with [`Shared::probe_done`] under this generation.
    Probe(u32),
    /// Rejected; `retry_after_ns` is how long until the breaker may let a probe through (0 if unknown).
    Reject { half_open: bool, retry_after_ns: u64 },
}

/// The record shared by all workers for one breaker target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    pub state: u8,
    /// Bumped on every state change; outcomes and probes of an older generation are discarded.
    pub gen: u32,
    pub open_until_ns: u64,
    pub permits: u32,
    pub probe_calls: u32,
    pub probe_failures: u32,
    pub probe_slow: u32,
    pub opened_total: u32,
    pub window: Window,
}

const MAGIC: u8 = b'B';

fn rd_u32(b: &[u8], at: &mut usize) -> Option<u32> {
    let v = u32::from_le_bytes(b.get(*at..*at + 4)?.try_into().ok()?);
    *at += 4;
    Some(v)
}

fn rd_u64(b: &[u8], at: &mut usize) -> Option<u64> {
    let v = u64::from_le_bytes(b.get(*at..*at + 8)?.try_into().ok()?);
    *at += 8;
    Some(v)
}

impl Shared {
    pub fn new(rule: &BreakerRule) -> Shared {
        Shared {
            state: CLOSED,
            gen: 0,
            open_until_ns: 0,
            permits: 0,
            probe_calls: 0,
            probe_failures: 0,
            probe_slow: 0,
            opened_total: 0,
            window: Window::new(rule),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(MAGIC);
        out.push(self.state);
        out.extend_from_slice(&self.gen.to_le_bytes());
        out.extend_from_slice(&self.open_until_ns.to_le_bytes());
        for v in [self.permits, self.probe_calls, self.probe_failures, self.probe_slow, self.opened_total] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        match &self.window {
            Window::Count { size, head, len, fail, slow } => {
                out.push(0);
                for v in [*size, *head, *len] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(fail);
                out.extend_from_slice(slow);
            }
            Window::Time { buckets } => {
                out.push(1);
                out.extend_from_slice(&(buckets.len() as u32).to_le_bytes());
                for b in buckets {
                    for v in [b.sec, b.calls, b.failures, b.slow] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        out
    }

    /// Reads a record; a malformed one, or one whose window no longer fits the rule (the rule changed),
    /// comes back as a fresh record that keeps the state but starts an empty window.
    pub fn decode(rule: &BreakerRule, b: &[u8]) -> Shared {
        Shared::try_decode(b)
            .map(|mut s| {
                if !s.window.fits(rule) {
                    s.window = Window::new(rule);
                }
                if s.state > HALF_OPEN {
                    s = Shared::new(rule);
                }
                s
            })
            .unwrap_or_else(|| Shared::new(rule))
    }

    fn try_decode(b: &[u8]) -> Option<Shared> {
        if b.first() != Some(&MAGIC) {
            return None;
        }
        let state = *b.get(1)?;
        let mut at = 2;
        let gen = rd_u32(b, &mut at)?;
        let open_until_ns = rd_u64(b, &mut at)?;
        let permits = rd_u32(b, &mut at)?;
        let probe_calls = rd_u32(b, &mut at)?;
        let probe_failures = rd_u32(b, &mut at)?;
        let probe_slow = rd_u32(b, &mut at)?;
        let opened_total = rd_u32(b, &mut at)?;
        let kind = *b.get(at)?;
        at += 1;
        let window = match kind {
            0 => {
                let size = rd_u32(b, &mut at)?;
                let head = rd_u32(b, &mut at)?;
                let len = rd_u32(b, &mut at)?;
                if size == 0 || head >= size || len > size {
                    return None;
                }
                let n = ((size + 7) / 8) as usize;
                let fail = b.get(at..at + n)?.to_vec();
                let slow = b.get(at + n..at + 2 * n)?.to_vec();
                at += 2 * n;
                Window::Count { size, head, len, fail, slow }
            }
            1 => {
                let n = rd_u32(b, &mut at)? as usize;
                if n == 0 || n > 100_000 || b.len() < at + n * 16 {
                    return None;
                }
                let mut buckets = Vec::with_capacity(n);
                for _ in 0..n {
                    buckets.push(Bucket {
                        sec: rd_u32(b, &mut at)?,
                        calls: rd_u32(b, &mut at)?,
                        failures: rd_u32(b, &mut at)?,
                        slow: rd_u32(b, &mut at)?,
                    });
                }
                Window::Time { buckets }
            }
            _ => return None,
        };
        if at != b.len() {
            return None;
        }
        Some(Shared { state, gen, open_until_ns, permits, probe_calls, probe_failures, probe_slow, opened_total, window })
    }

    fn open(&mut self, rule: &BreakerRule, now_ns: u64) {
        self.state = OPEN;
        self.gen = self.gen.wrapping_add(1);
        self.open_until_ns = now_ns.saturating_add(rule.open_wait_ns);
        self.permits = 0;
        self.probe_calls = 0;
        self.probe_failures = 0;
        self.probe_slow = 0;
        self.opened_total = self.opened_total.wrapping_add(1);
        self.window = Window::new(rule);
    }

    fn close(&mut self, rule: &BreakerRule) {
        self.state = CLOSED;
        self.gen = self.gen.wrapping_add(1);
        self.open_until_ns = 0;
        self.permits = 0;
        self.probe_calls = 0;
        self.probe_failures = 0;
        self.probe_slow = 0;
        self.window = Window::new(rule);
    }

    /// Folds a worker's pending outcomes (gathered under generation `gen` while closed) into the
    /// window and opens the breaker if the rates trip it. Returns true if the record changed.
    pub fn fold(&mut self, rule: &BreakerRule, pending: &Pending, gen: u32, now_ns: u64) -> bool {
        if self.state != CLOSED || self.gen != gen || pending.is_empty() {
            return false;
        }
        match pending {
            Pending::Count(v) => {
                let skip = v.len().saturating_sub(rule.window_size as usize);
                for o in &v[skip..] {
                    self.window.push_count(*o);
                }
            }
            Pending::Time(v) => {
                for b in v {
                    self.window.add_time(*b);
                }
            }
        }
        let (c, f, s) = self.window.totals((now_ns / NS) as u32);
        if trips(rule, rule.min_calls, c, f, s) {
            self.open(rule, now_ns);
        }
        true
    }

    /// Decides on a request and moves open → half-open when the wait is over. Returns the decision and
    /// whether the record changed (and must be written back).
    pub fn admit(&mut self, rule: &BreakerRule, now_ns: u64) -> (Admit, bool) {
        match self.state {
            CLOSED => (Admit::Allow, false),
            OPEN if now_ns < self.open_until_ns => {
                (Admit::Reject { half_open: false, retry_after_ns: self.open_until_ns - now_ns }, false)
            }
            OPEN => self.start_half_open(rule, now_ns),
            // All probes are out but some never reported within a wait period (a worker restarted,
            // a probe hangs): start a fresh half-open round rather than stay stuck.
            HALF_OPEN if self.permits == 0 && now_ns >= self.open_until_ns => self.start_half_open(rule, now_ns),
            _ if self.permits > 0 => {
                self.permits -= 1;
                (Admit::Probe(self.gen), true)
            }
            _ => (Admit::Reject { half_open: true, retry_after_ns: 0 }, false),
        }
    }

    fn start_half_open(&mut self, rule: &BreakerRule, now_ns: u64) -> (Admit, bool) {
        self.state = HALF_OPEN;
        self.gen = self.gen.wrapping_add(1);
        // In half-open this is the deadline for the probes to report.
        self.open_until_ns = now_ns.saturating_add(rule.open_wait_ns.max(NS));
        self.permits = rule.half_open_calls - 1;
        self.probe_calls = 0;
        self.probe_failures = 0;
        self.probe_slow = 0;
        (Admit::Probe(self.gen), true)
    }

    /// Records a probe's outcome; once all permitted probes have reported, closes or re-opens.
    /// Returns true if the record changed.
    pub fn probe_done(&mut self, rule: &BreakerRule, gen: u32, o: Outcome, now_ns: u64) -> bool {
        if self.state != HALF_OPEN || self.gen != gen {
            return false;
        }
        self.probe_calls += 1;
        self.probe_failures += o.failure as u32;
        self.probe_slow += o.slow as u32;
        if self.probe_calls >= rule.half_open_calls {
            if trips(rule, 1, self.probe_calls, self.probe_failures, self.probe_slow) {
                self.open(rule, now_ns);
            } else {
                self.close(rule);
            }
        }
        true
    }
}

/// A worker's cached view of one target plus the outcomes it has not folded in yet.
#[derive(Debug, Clone)]
pub struct Local {
    pub state: u8,
    pub gen: u32,
    pub open_until_ns: u64,
    pub opened_total: u32,
    win: (u32, u32, u32),
    pub pending: Pending,
    pend: (u32, u32, u32),
    pending_gen: u32,
}

impl Local {
    pub fn new(rule: &BreakerRule) -> Local {
        Local {
            state: CLOSED,
            gen: 0,
            open_until_ns: 0,
            opened_total: 0,
            win: (0, 0, 0),
            pending: Pending::new(rule),
            pend: (0, 0, 0),
            pending_gen: 0,
        }
    }

    /// Refreshes the cached view; pending outcomes from another generation are dropped.
    pub fn sync(&mut self, s: &Shared, now_ns: u64) {
        self.state = s.state;
        self.gen = s.gen;
        self.open_until_ns = s.open_until_ns;
        self.opened_total = s.opened_total;
        self.win = s.window.totals((now_ns / NS) as u32);
        if self.pending_gen != s.gen || s.state != CLOSED {
            self.pending.clear();
            self.pend = (0, 0, 0);
            self.pending_gen = s.gen;
        }
    }

    /// Hands the pending outcomes to a fold; returns them with the generation they belong to.
    pub fn take_pending(&mut self, rule: &BreakerRule) -> (Pending, u32) {
        self.pend = (0, 0, 0);
        (std::mem::replace(&mut self.pending, Pending::new(rule)), self.pending_gen)
    }

    /// Notes a closed-state outcome timed by the worker's tick clock `tick_ns` (free, but up to one
    /// tick old). Returns `Some(now)` when it may trip the breaker and must be folded at once, with
    /// `now` read from `host_now` (the real clock): the fold may open the breaker, and the open wait
    /// counts from the trip, not from the last tick. None: the next tick folds it.
    pub fn note(&mut self, rule: &BreakerRule, o: Outcome, tick_ns: u64, host_now: impl FnOnce() -> u64) -> Option<u64> {
        if self.record(rule, o, tick_ns) {
            Some(host_now())
        } else {
            None
        }
    }

    /// Notes a closed-state outcome. Returns true when this failure may trip the breaker, so the
    /// caller should fold now instead of waiting for the tick.
    pub fn record(&mut self, rule: &BreakerRule, o: Outcome, now_ns: u64) -> bool {
        if self.state != CLOSED {
            return false;
        }
        self.pending.push(rule, o, (now_ns / NS) as u32);
        self.pend.0 += 1;
        self.pend.1 += o.failure as u32;
        self.pend.2 += o.slow as u32;
        if !(o.failure || o.slow) {
            return false;
        }
        let mut calls = self.win.0 + self.pend.0;
        if rule.window == WindowKind::Count {
            calls = calls.min(rule.window_size);
        }
        let f = (self.win.1 + self.pend.1).min(calls);
        let s = (self.win.2 + self.pend.2).min(calls);
        trips(rule, rule.min_calls, calls, f, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn rule(extra: &str) -> BreakerRule {
        let mut doc = String::from("[breaker t]\n");
        for base in ["window_size = 10", "min_calls = 5", "failure_rate = 50", "open_wait = 1s", "half_open_calls = 2"] {
            let key = base.split(' ').next().unwrap_or("");
            if !extra.contains(key) {
                doc.push_str(base);
                doc.push('\n');
            }
        }
        doc.push_str(extra);
        parse(doc.as_bytes()).expect("valid").breakers.remove(0)
    }

    const OK: Outcome = Outcome { failure: false, slow: false };
    const FAIL: Outcome = Outcome { failure: true, slow: false };
    const SLOW: Outcome = Outcome { failure: false, slow: true };
    const T0: u64 = 1_700_000_000 * NS;

    /// A worker that folds after every call, as a sequential client would see it.
    fn call(s: &mut Shared, l: &mut Local, r: &BreakerRule, o: Outcome, now: u64) -> Admit {
        let (a, _) = s.admit(r, now);
        match a {
            Admit::Allow => {
                l.record(r, o, now);
                let (p, g) = l.take_pending(r);
                s.fold(r, &p, g, now);
                l.sync(s, now);
            }
            Admit::Probe(g) => {
                s.probe_done(r, g, o, now);
                l.sync(s, now);
            }
            Admit::Reject { .. } => {}
        }
        a
    }

    #[test]
    fn opens_at_the_failure_rate_after_min_calls() {
        let r = rule("");
        let (mut s, mut l) = (Shared::new(&r), Local::new(&r));
        for _ in 0..4 {
            assert_eq!(call(&mut s, &mut l, &r, FAIL, T0), Admit::Allow);
        }
        assert_eq!(s.state, CLOSED, "4 calls are below min_calls=5, expected closed");
        assert_eq!(call(&mut s, &mut l, &r, FAIL, T0), Admit::Allow);
        assert_eq!(s.state, OPEN, "5 failures of 5 calls, expected open, got {}", s.state);
        match call(&mut s, &mut l, &r, OK, T0 + 1) {
            Admit::Reject { half_open: false, retry_after_ns } => assert!(retry_after_ns > 0),
            a => panic!("expected a rejection while open, got {:?}", a),
        }
    }

    #[test]
    fn open_wait_counts_from_the_trip_not_from_the_last_tick() {
        let r = rule("");
        let (mut s, mut l) = (Shared::new(&r), Local::new(&r));
        let tick = T0; // the worker's tick clock, 90 ms behind the host's
        let real = T0 + 90_000_000;
        let mut fold_at = None;
        for i in 0..5 {
            fold_at = l.note(&r, FAIL, tick, || real);
            assert_eq!(fold_at.is_some(), i == 4, "failure {}: a fold is due only once the 5th may trip", i + 1);
        }
        let now = fold_at.unwrap_or(0);
        assert_eq!(now, real, "the fold that may open the breaker must be stamped by the host clock, got {}", now);
        let (p, g) = l.take_pending(&r);
        s.fold(&r, &p, g, now);
        assert_eq!(s.state, OPEN, "5 failures of 5 calls, expected open");
        assert_eq!(s.open_until_ns, real + r.open_wait_ns, "the open wait must count from the trip");
        match s.admit(&r, real + r.open_wait_ns - 1).0 {
            Admit::Reject { half_open: false, retry_after_ns: 1 } => {}
            a => panic!("expected a rejection 1 ns before the wait is over, got {:?}", a),
        }
        assert!(matches!(s.admit(&r, real + r.open_wait_ns).0, Admit::Probe(_)), "expected a probe once the wait is over");
        assert_eq!(l.note(&r, OK, tick, || panic!("a success must not read the host clock")), None);
    }

    #[test]
    fn count_window_slides() {
        let r = rule("");
        let (mut s, mut l) = (Shared::new(&r), Local::new(&r));
        for _ in 0..10 {
            call(&mut s, &mut l, &r, OK, T0);
        }
        for i in 0..4 {
            call(&mut s, &mut l, &r, FAIL, T0);
            assert_eq!(s.state, CLOSED, "after {} failures in a window of 10, expected closed", i + 1);
        }
        call(&mut s, &mut l, &r, FAIL, T0);
        assert_eq!(s.state, OPEN, "5 of the last 10 failed, expected open");
    }

    #[test]
    fn half_open_lets_exactly_the_permitted_probes_through() {
        let r = rule("");
        let mut s = Shared::new(&r);
        s.open(&r, T0);
        let later = T0 + r.open_wait_ns;
        let a1 = s.admit(&r, later).0;
        let a2 = s.admit(&r, later).0;
        let a3 = s.admit(&r, later).0;
        assert!(matches!(a1, Admit::Probe(_)) && matches!(a2, Admit::Probe(_)), "expected two probes, got {:?} {:?}", a1, a2);
        assert_eq!(a3, Admit::Reject { half_open: true, retry_after_ns: 0 });
        let g = match a1 {
            Admit::Probe(g) => g,
            _ => unreachable!(),
        };
        s.probe_done(&r, g, OK, later);
        assert_eq!(s.state, HALF_OPEN, "one of two probes reported, expected half-open");
        s.probe_done(&r, g, OK, later);
        assert_eq!(s.state, CLOSED, "both probes succeeded, expected closed");
    }

    #[test]
    fn a_lost_probe_does_not_stick_half_open() {
        let r = rule("half_open_calls = 1\n");
        let mut s = Shared::new(&r);
        s.open(&r, T0);
        let later = T0 + r.open_wait_ns;
        let g1 = s.admit(&r, later).0;
        assert!(matches!(s.admit(&r, later + 1).0, Admit::Reject { half_open: true, .. }));
        let g2 = s.admit(&r, later + r.open_wait_ns).0;
        assert!(matches!(g2, Admit::Probe(_)) && g1 != g2, "expected a new round after the deadline, got {:?} then {:?}", g1, g2);
    }

    #[test]
    fn failed_probe_reopens() {
        let r = rule("");
        let mut s = Shared::new(&r);
        s.open(&r, T0);
        let later = T0 + r.open_wait_ns + 1;
        let g = match s.admit(&r, later).0 {
            Admit::Probe(g) => g,
            a => panic!("expected a probe, got {:?}", a),
        };
        s.admit(&r, later);
        s.probe_done(&r, g, FAIL, later);
        s.probe_done(&r, g, OK, later);
        assert_eq!(s.state, OPEN, "1 of 2 probes failed at a 50% threshold, expected open");
        assert_eq!(s.open_until_ns, later + r.open_wait_ns);
        assert!(!s.probe_done(&r, g, OK, later), "a probe of an old generation must be ignored");
    }

    #[test]
    fn slow_calls_trip_when_enabled() {
        let r = rule("slow_call_duration = 100ms\nslow_call_rate = 60\n");
        let (mut s, mut l) = (Shared::new(&r), Local::new(&r));
        for _ in 0..2 {
            call(&mut s, &mut l, &r, OK, T0);
        }
        for _ in 0..3 {
            call(&mut s, &mut l, &r, SLOW, T0);
        }
        assert_eq!(s.state, OPEN, "3 slow of 5 at 60%, expected open");
        let r2 = rule("");
        let (mut s2, mut l2) = (Shared::new(&r2), Local::new(&r2));
        for _ in 0..6 {
            call(&mut s2, &mut l2, &r2, SLOW, T0);
        }
        assert_eq!(s2.state, CLOSED, "slow calls must not count when slow_call_duration is off");
    }

    #[test]
    fn time_window_forgets_old_seconds() {
        let r = rule("window = time\nwindow_size = 5\n");
        let (mut s, mut l) = (Shared::new(&r), Local::new(&r));
        for _ in 0..4 {
            call(&mut s, &mut l, &r, FAIL, T0);
        }
        // 10 s later those failures are outside the 5 s window.
        for _ in 0..4 {
            call(&mut s, &mut l, &r, OK, T0 + 10 * NS);
        }
        call(&mut s, &mut l, &r, FAIL, T0 + 10 * NS);
        assert_eq!(s.state, CLOSED, "1 failure in 5 calls inside the window, expected closed");
        assert_eq!(s.window.totals(((T0 + 10 * NS) / NS) as u32), (5, 1, 0));
    }

    #[test]
    fn two_workers_fold_into_one_window() {
        let r = rule("");
        let mut s = Shared::new(&r);
        let (mut a, mut b) = (Local::new(&r), Local::new(&r));
        for _ in 0..3 {
            a.record(&r, FAIL, T0);
            b.record(&r, FAIL, T0);
        }
        let (p, g) = a.take_pending(&r);
        s.fold(&r, &p, g, T0);
        assert_eq!(s.state, CLOSED, "3 calls < min_calls");
        let (p, g) = b.take_pending(&r);
        s.fold(&r, &p, g, T0);
        assert_eq!(s.state, OPEN, "6 failures from two workers, expected open");
        // A worker's outcomes gathered before the breaker opened are stale afterwards.
        a.record(&r, OK, T0);
        let (p, g) = a.take_pending(&r);
        assert!(!s.fold(&r, &p, g, T0), "a fold from an old generation must not apply");
    }

    #[test]
    fn local_trigger_predicts_the_trip() {
        let r = rule("");
        let mut l = Local::new(&r);
        for _ in 0..4 {
            assert!(!l.record(&r, FAIL, T0), "below min_calls, no early fold expected");
        }
        assert!(l.record(&r, FAIL, T0), "5 failures reach the threshold, expected an early fold");
        assert!(!l.record(&r, OK, T0), "a success never triggers an early fold");
    }

    #[test]
    fn records_round_trip_and_junk_is_fresh() {
        for extra in ["", "window = time\nwindow_size = 7\n"] {
            let r = rule(extra);
            let mut s = Shared::new(&r);
            let mut l = Local::new(&r);
            l.record(&r, FAIL, T0);
            l.record(&r, OK, T0);
            let (p, g) = l.take_pending(&r);
            s.fold(&r, &p, g, T0);
            s.admit(&r, T0);
            let bytes = s.encode();
            assert_eq!(Shared::decode(&r, &bytes), s, "round trip changed the record");
            for cut in 0..bytes.len() {
                let d = Shared::decode(&r, &bytes[..cut]);
                assert_eq!(d, Shared::new(&r), "a truncated record must decode as fresh");
            }
        }
        let r = rule("");
        let other = rule("window_size = 20\n");
        let mut s = Shared::new(&other);
        s.open(&other, T0);
        let d = Shared::decode(&r, &s.encode());
        assert_eq!((d.state, d.window.clone()), (OPEN, Window::new(&r)), "a changed window keeps the state");
    }
}
