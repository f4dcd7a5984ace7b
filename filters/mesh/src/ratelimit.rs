//! The rate limiter's token bucket and per-worker leases, free of any host call.
//!
//! Each bucket (one per rule and key: service, route, caller or header value) lives in Envoy's shared
//! data as a [`Bucket`], so all workers of an Envoy draw from the same tokens. To keep host calls off
//! the per-request path a worker does not take one token at a time: it takes a small lease of tokens
//! ([`lease_size`]) with one compare-and-swap and spends it locally ([`Lease`]). A worker that stops
//! using its lease gives it back on the next tick, so the total admitted stays `burst + rate × t`
//! up to the few leased tokens still in flight.

use crate::config::LimitRule;

const MICRO: u64 = 1_000_000;
const NS: u128 = 1_000_000_000;

/// The shared bucket: tokens in millionths, and the time they were last refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub tokens_micro: u64,
    pub last_ns: u64,
}

const MAGIC: u8 = b'R';

impl Bucket {
    /// A new bucket starts full.
    pub fn new(rule: &LimitRule, now_ns: u64) -> Bucket {
        Bucket { tokens_micro: rule.burst as u64 * MICRO, last_ns: now_ns }
    }

    pub fn encode(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[0] = MAGIC;
        out[1..9].copy_from_slice(&self.tokens_micro.to_le_bytes());
        out[9..17].copy_from_slice(&self.last_ns.to_le_bytes());
        out
    }

    /// Reads a record; a malformed one becomes a full bucket.
    pub fn decode(rule: &LimitRule, b: &[u8], now_ns: u64) -> Bucket {
        if b.len() != 17 || b[0] != MAGIC {
            return Bucket::new(rule, now_ns);
        }
        let mut t = [0u8; 8];
        t.copy_from_slice(&b[1..9]);
        let mut l = [0u8; 8];
        l.copy_from_slice(&b[9..17]);
        let cap = rule.burst as u64 * MICRO;
        Bucket { tokens_micro: u64::from_le_bytes(t).min(cap), last_ns: u64::from_le_bytes(l) }
    }

    /// Adds the tokens earned since `last_ns`, up to the burst. A clock that steps back adds nothing.
    pub fn refill(&mut self, rule: &LimitRule, now_ns: u64) {
        if now_ns <= self.last_ns {
            return;
        }
        let cap = rule.burst as u64 * MICRO;
        let earned = (now_ns - self.last_ns) as u128 * rule.rate_micro as u128 / NS;
        let tokens = (self.tokens_micro as u128 + earned).min(cap as u128) as u64;
        if tokens == cap {
            self.last_ns = now_ns;
        } else {
            // Advance only by the time the earned tokens account for, so rounding loses nothing.
            let used_ns = (earned * NS / rule.rate_micro.max(1) as u128) as u64;
            self.last_ns = self.last_ns.saturating_add(used_ns).min(now_ns);
        }
        self.tokens_micro = tokens;
    }

    /// Takes up to `want` whole tokens; returns how many it took.
    pub fn take(&mut self, want: u64) -> u64 {
        let n = (self.tokens_micro / MICRO).min(want);
        self.tokens_micro -= n * MICRO;
        n
    }

    /// Returns unused tokens, up to the burst.
    pub fn give_back(&mut self, rule: &LimitRule, n: u64) {
        let cap = rule.burst as u64 * MICRO;
        self.tokens_micro = self.tokens_micro.saturating_add(n.saturating_mul(MICRO)).min(cap);
    }

    /// Nanoseconds until one whole token is available.
    pub fn wait_ns(&self, rule: &LimitRule) -> u64 {
        if self.tokens_micro >= MICRO {
            return 0;
        }
        let missing = (MICRO - self.tokens_micro) as u128;
        let ns = (missing * NS + rule.rate_micro as u128 - 1) / rule.rate_micro.max(1) as u128;
        ns.min(u64::MAX as u128) as u64
    }

    pub fn whole_tokens(&self) -> u64 {
        self.tokens_micro / MICRO
    }
}

/// Tokens a worker takes per compare-and-swap: about 20 ms worth of the rate, at least 1 and at most a
/// quarter of the burst, so leases never hold back a meaningful share of the bucket.
pub fn lease_size(rule: &LimitRule) -> u64 {
    let per_20ms = rule.rate_micro / MICRO / 50;
    per_20ms.min(rule.burst as u64 / 4).clamp(1, 256)
}

/// A worker's lease on one bucket.
#[derive(Debug, Clone, Default)]
pub struct Lease {
    pub tokens: u64,
    /// The bucket was empty: reject locally until this time without asking the shared bucket.
    pub empty_until_ns: u64,
    pub used_since_tick: bool,
    pub allowed: u64,
    pub rejected: u64,
    /// Whole tokens left in the shared bucket when this worker last looked (for the gauge).
    pub last_seen_tokens: u64,
}

/// What the per-request path can decide without the shared bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quick {
    Allow,
    Reject { retry_after_ns: u64 },
    /// Go to the shared bucket for a new lease.
    Refill,
}

impl Lease {
    /// Spends a leased token if there is one. `now_ns` is only needed when the lease is empty; the
    /// closure is called at most once.
    pub fn quick(&mut self, now: impl FnOnce() -> u64) -> (Quick, u64) {
        if self.tokens > 0 {
            self.tokens -= 1;
            self.allowed += 1;
            self.used_since_tick = true;
            return (Quick::Allow, 0);
        }
        let t = now();
        if t < self.empty_until_ns {
            self.rejected += 1;
            return (Quick::Reject { retry_after_ns: self.empty_until_ns - t }, t);
        }
        (Quick::Refill, t)
    }

    /// Applies the result of a lease attempt on the shared bucket (already refilled and taken from).
    /// Returns true if the request is allowed.
    pub fn refilled(&mut self, rule: &LimitRule, bucket: &Bucket, taken: u64, now_ns: u64) -> bool {
        self.last_seen_tokens = bucket.whole_tokens();
        if taken == 0 {
            self.empty_until_ns = now_ns.saturating_add(bucket.wait_ns(rule));
            self.rejected += 1;
            return false;
        }
        self.tokens = taken - 1;
        self.allowed += 1;
        self.used_since_tick = true;
        true
    }

    /// On a tick: the tokens to give back (an idle lease), if any.
    pub fn tick(&mut self) -> u64 {
        let give = if self.used_since_tick { 0 } else { std::mem::take(&mut self.tokens) };
        self.used_since_tick = false;
        give
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn rule(rate: &str, burst: u32) -> LimitRule {
        let doc = format!("[ratelimit r]\nrate = {}\nburst = {}\n", rate, burst);
        parse(doc.as_bytes()).expect("valid").limits.remove(0)
    }

    const T0: u64 = 1_700_000_000_000_000_000;
    const MS: u64 = 1_000_000;

    /// Drives `workers` leases against one shared bucket: every `step_ns` each worker sees a request.
    /// Returns the number admitted.
    fn simulate(r: &LimitRule, workers: usize, step_ns: u64, dur_ns: u64, tick_ns: u64) -> u64 {
        let mut shared = Bucket::new(r, T0);
        let mut leases = vec![Lease::default(); workers];
        let mut admitted = 0;
        let mut now = T0;
        let mut next_tick = T0 + tick_ns;
        while now < T0 + dur_ns {
            for l in leases.iter_mut() {
                match l.quick(|| now).0 {
                    Quick::Allow => admitted += 1,
                    Quick::Reject { .. } => {}
                    Quick::Refill => {
                        shared.refill(r, now);
                        let taken = shared.take(lease_size(r));
                        if l.refilled(r, &shared, taken, now) {
                            admitted += 1;
                        }
                    }
                }
            }
            now += step_ns;
            if now >= next_tick {
                for l in leases.iter_mut() {
                    let back = l.tick();
                    shared.refill(r, now);
                    shared.give_back(r, back);
                }
                next_tick += tick_ns;
            }
        }
        admitted
    }

    #[test]
    fn admits_rate_times_duration_plus_burst() {
        for (rate, per_s, burst) in [("500/s", 500u64, 100u32), ("30000/m", 500, 50), ("2000/s", 2000, 1), ("3.5/s", 3, 5)] {
            let r = rule(rate, burst);
            // Two workers, each seeing a request every 50 µs (40k rps offered in total), for 10 s.
            let got = simulate(&r, 2, 50_000, 10_000 * MS, 100 * MS);
            let want = if rate == "3.5/s" { 35 + 5 } else { per_s * 10 + burst as u64 };
            let tol = (want / 100).max(1); // the leases in flight at the end
            assert!(
                got + tol >= want && got <= want + 1,
                "rate {} burst {}: expected {} ± {} admitted, got {}",
                rate,
                burst,
                want,
                tol,
                got
            );
        }
    }

    #[test]
    fn under_the_limit_everything_passes() {
        let r = rule("1000/s", 10);
        // One request per 2 ms per worker, two workers: 1000 rps offered, exactly the rate.
        let got = simulate(&r, 2, 2 * MS, 1_000 * MS, 100 * MS);
        assert!(got >= 995, "expected ~1000 admitted at the rate, got {}", got);
    }

    #[test]
    fn refill_is_exact_over_many_small_steps() {
        let r = rule("3/s", 1000);
        let mut b = Bucket::new(&r, T0);
        b.take(1000);
        let mut now = T0;
        for _ in 0..10_000 {
            now += 1_000_037; // ~1 ms, deliberately not dividing evenly
            b.refill(&r, now);
        }
        let want = (now - T0) as u128 * 3 / 1_000_000_000;
        assert_eq!(b.whole_tokens() as u128, want, "rounding must not lose tokens over many refills");
    }

    #[test]
    fn wait_and_clock_steps() {
        let r = rule("10/s", 1);
        let mut b = Bucket::new(&r, T0);
        assert_eq!(b.take(5), 1, "a burst of 1 gives one token");
        assert_eq!(b.wait_ns(&r), 100 * MS, "10/s refills one token in 100 ms");
        b.refill(&r, T0 - 5 * MS);
        assert_eq!(b.whole_tokens(), 0, "a clock step back adds nothing");
        b.refill(&r, T0 + 100 * MS);
        assert_eq!(b.whole_tokens(), 1);
    }

    #[test]
    fn records_round_trip_and_junk_is_full() {
        let r = rule("10/s", 7);
        let b = Bucket { tokens_micro: 3_500_000, last_ns: T0 };
        assert_eq!(Bucket::decode(&r, &b.encode(), 0), b);
        assert_eq!(Bucket::decode(&r, b"junk", T0), Bucket::new(&r, T0));
        let over = Bucket { tokens_micro: 100 * MICRO, last_ns: T0 };
        assert_eq!(Bucket::decode(&r, &over.encode(), T0).tokens_micro, 7 * MICRO, "a shrunk burst caps old tokens");
    }

    #[test]
    fn idle_leases_go_back() {
        let mut l = Lease { tokens: 5, used_since_tick: true, ..Lease::default() };
        assert_eq!(l.tick(), 0, "a lease in use is kept");
        assert_eq!(l.tick(), 5, "an idle lease is returned");
        assert_eq!(l.tokens, 0);
    }
}
