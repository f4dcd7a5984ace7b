//! meshpilot's governance filter for Envoy: a circuit breaker and a rate limiter in one WASM module.
//!
//! The control plane renders `CircuitBreakerPolicy` and `RateLimitPolicy` objects into the text
//! format of [`config`] and delivers it as the filter's plugin configuration. The decisions are plain
//! Rust ([`breaker`], [`ratelimit`]), unit-tested natively; `filter` (wasm32 only) is the thin
//! proxy-wasm glue: it reads request properties, keeps per-worker views, folds them into Envoy's
//! shared data on a timer tick, sends local replies and reports metrics. One module carries both
//! filters so a request enters the VM once for both.

pub mod breaker;
pub mod config;
pub mod keys;
pub mod ratelimit;

#[cfg(target_arch = "wasm32")]
mod filter;
