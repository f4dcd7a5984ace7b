//! Names: shared-data keys, stat names and request-derived key values.
//!
//! Shared data is process-wide per VM id and cannot be deleted, so every key the filter creates is
//! derived here and bounded: values taken from requests are truncated to [`MAX_VALUE_BYTES`], and the
//! number of distinct values per rule is capped by the config's `max_keys` (beyond it, requests share
//! the [`OVERFLOW`] key).

pub const MAX_VALUE_BYTES: usize = 128;
/// The shared key for values beyond `max_keys`.
pub const OVERFLOW: &str = "~overflow";
/// The key for requests that lack the value a rule is keyed by (e.g. no `x-mesh-caller`).
pub const MISSING: &str = "~none";

/// Turns raw bytes from a request into a key value: lossy UTF-8, at most 128 bytes, no NULs.
pub fn value(raw: &[u8]) -> String {
    if raw.is_empty() {
        return MISSING.to_string();
    }
    let cut = &raw[..raw.len().min(MAX_VALUE_BYTES)];
    let s = String::from_utf8_lossy(cut);
    if s.contains('\0') {
        s.replace('\0', "_")
    } else {
        s.into_owned()
    }
}

pub fn breaker_key(rule: &str, target: &str) -> String {
    format!("meshpilot/cb/{}/{}", rule, target)
}

pub fn limit_key(rule: &str, value: &str) -> String {
    format!("meshpilot/rl/{}/{}", rule, value)
}

/// The shared counter of distinct keys created for one rule.
pub fn key_count_key(kind: &str, rule: &str) -> String {
    format!("meshpilot/{}-keys/{}", kind, rule)
}

/// A stat-name segment: anything but `[A-Za-z0-9_-]` becomes `_` (dots would split the name).
pub fn stat_segment(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Parses an HTTP `:status` value; 0 if it is not three digits.
pub fn status(raw: &[u8]) -> u32 {
    if raw.len() != 3 || !raw.iter().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    raw.iter().fold(0, |n, b| n * 10 + (b - b'0') as u32)
}

/// Seconds for a Retry-After header: rounded up, at least 1.
pub fn retry_after_s(ns: u64) -> u64 {
    ((ns + 999_999_999) / 1_000_000_000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_bounded() {
        assert_eq!(value(b""), MISSING);
        assert_eq!(value(&[b'a'; 500]).len(), MAX_VALUE_BYTES);
        assert_eq!(value(b"a\0b"), "a_b");
        assert_eq!(value(&[0xff, b'x']), "\u{fffd}x");
    }

    #[test]
    fn stat_segments_and_status() {
        assert_eq!(stat_segment("orders.default:80"), "orders_default_80");
        assert_eq!(status(b"503"), 503);
        assert_eq!(status(b"5x3"), 0);
        assert_eq!(status(b"2000"), 0);
        assert_eq!(retry_after_s(1), 1);
        assert_eq!(retry_after_s(1_000_000_001), 2);
        assert_eq!(retry_after_s(0), 1);
    }
}
