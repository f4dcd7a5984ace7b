//! Minimal proxy-wasm ABI v0.2.1 bindings used by meshpilot's Envoy filters.
//!
//! The filters run inside Envoy's V8 WASM runtime. This crate holds what every filter module needs to
//! speak to the host: the ABI's numeric constants, the wire format of header maps, the memory hand-off
//! (`allocate` backs the module's `proxy_on_memory_allocate` export, and buffers the host hands back are
//! owned by [`HostBuf`]), and thin safe wrappers over the host calls in [`host`] (compiled for wasm32
//! only, so the rest of the crate is unit-tested natively). Every wrapper returns a `Result` or `Option`:
//! nothing here panics on what the host returns.

#![forbid(unsafe_op_in_unsafe_fn)]

use std::alloc::{alloc, dealloc, Layout};

/// Status codes returned by host calls (`proxy_status_t`).
pub mod status {
    pub const OK: u32 = 0;
    pub const NOT_FOUND: u32 = 1;
    pub const BAD_ARGUMENT: u32 = 2;
    pub const CAS_MISMATCH: u32 = 8;
}

/// Return values of `proxy_on_request_headers` / `proxy_on_response_headers`.
pub mod action {
    pub const CONTINUE: u32 = 0;
    pub const PAUSE: u32 = 1;
}

/// Header map types (`proxy_map_type_t`).
pub mod map {
    pub const REQUEST_HEADERS: u32 = 0;
    pub const RESPONSE_HEADERS: u32 = 2;
}

/// Buffer types (`proxy_buffer_type_t`).
pub mod buffer {
    pub const VM_CONFIGURATION: u32 = 6;
    pub const PLUGIN_CONFIGURATION: u32 = 7;
}

/// Metric types (`proxy_metric_type_t`).
pub mod metric {
    pub const COUNTER: u32 = 0;
    pub const GAUGE: u32 = 1;
}

/// Log levels (`proxy_log_level_t`).
pub mod level {
    pub const DEBUG: u32 = 1;
    pub const INFO: u32 = 2;
    pub const WARN: u32 = 3;
    pub const ERROR: u32 = 4;
}

/// Stream types for `proxy_continue_stream`.
pub mod stream {
    pub const REQUEST: u32 = 0;
    pub const RESPONSE: u32 = 1;
}

/// Allocates `size` bytes for the host (the body of `proxy_on_memory_allocate`). The host writes into
/// the block and passes its address back; [`HostBuf::from_raw`] takes ownership. Zero-size requests
/// get a one-byte block so every returned pointer is a real allocation.
pub fn allocate(size: usize) -> *mut u8 {
    match Layout::from_size_align(size.max(1), 1) {
        // SAFETY: the layout has a non-zero size.
        Ok(layout) => unsafe { alloc(layout) },
        Err(_) => std::ptr::null_mut(),
    }
}

/// The exports every meshpilot module has: the ABI version marker, the reactor initialiser and the
/// host's allocator. Invoke once at a module's top level (`meshpilot_abi::reactor_exports!();`).
///
/// A reactor module: Envoy calls `_initialize` once after instantiation. Referencing the linker's
/// constructor function there also stops the linker from wrapping every export in a constructor
/// call, which would run WASI start-up code (refused inside `proxy_on_memory_allocate`) on every
/// callback.
#[macro_export]
macro_rules! reactor_exports {
    () => {
        #[no_mangle]
        pub extern "C" fn proxy_abi_version_0_2_1() {}

        extern "C" {
            fn __wasm_call_ctors();
        }

        #[no_mangle]
        pub extern "C" fn _initialize() {
            // SAFETY: called once by the host before any other export, as the reactor ABI requires.
            unsafe { __wasm_call_ctors() }
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
            $crate::allocate(size)
        }
    };
}

/// A block the host filled, allocated through [`allocate`]; freed on drop.
pub struct HostBuf {
    ptr: *mut u8,
    len: usize,
}

impl HostBuf {
    /// Takes ownership of a block returned by the host.
    ///
    /// # Safety
    /// `ptr` must be null or come from [`allocate`] with a size of at least `len` (the host allocates
    /// exactly `len` bytes through `proxy_on_memory_allocate`).
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Option<HostBuf> {
        if ptr.is_null() {
            return None;
        }
        Some(HostBuf { ptr, len })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` initialised bytes owned by this value.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.len.max(1), 1) {
            // SAFETY: allocated by `allocate` with this very layout.
            unsafe { dealloc(self.ptr, layout) }
        }
    }
}

/// Serialises header pairs the way the host reads them: a u32 count, then (key length, value length)
/// as u32 pairs, then each key and value followed by a NUL byte. All integers little-endian.
pub fn encode_pairs(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut size = 4 + pairs.len() * 8;
    for (k, v) in pairs {
        size += k.len() + v.len() + 2;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses a serialised header map; `None` if the bytes are not a well-formed map.
pub fn decode_pairs(data: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let count = u32::from_le_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    if count > data.len() / 8 {
        return None;
    }
    let mut sizes = Vec::with_capacity(count);
    for i in 0..count {
        let at = 4 + i * 8;
        let k = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
        let v = u32::from_le_bytes(data.get(at + 4..at + 8)?.try_into().ok()?) as usize;
        sizes.push((k, v));
    }
    let mut at = 4 + count * 8;
    let mut out = Vec::with_capacity(count);
    for (k, v) in sizes {
        let key = data.get(at..at.checked_add(k)?)?;
        at = at.checked_add(k)?;
        if data.get(at) != Some(&0) {
            return None;
        }
        at += 1;
        let value = data.get(at..at.checked_add(v)?)?;
        at = at.checked_add(v)?;
        if data.get(at) != Some(&0) {
            return None;
        }
        at += 1;
        out.push((key, value));
    }
    Some(out)
}

/// The host calls, compiled only where a host exists.
#[cfg(target_arch = "wasm32")]
pub mod host {
    use super::{status, HostBuf};

    mod sys {
        extern "C" {
            pub fn proxy_log(level: u32, msg: *const u8, len: usize) -> u32;
            pub fn proxy_get_current_time_nanoseconds(out: *mut u64) -> u32;
            pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
            pub fn proxy_get_buffer_bytes(
                kind: u32,
                start: usize,
                max: usize,
                out: *mut *mut u8,
                out_len: *mut usize,
            ) -> u32;
            pub fn proxy_get_header_map_value(
                map: u32,
                key: *const u8,
                key_len: usize,
                out: *mut *mut u8,
                out_len: *mut usize,
            ) -> u32;
            pub fn proxy_get_header_map_pairs(map: u32, out: *mut *mut u8, out_len: *mut usize) -> u32;
            pub fn proxy_add_header_map_value(
                map: u32,
                key: *const u8,
                key_len: usize,
                value: *const u8,
                value_len: usize,
            ) -> u32;
            pub fn proxy_replace_header_map_value(
                map: u32,
                key: *const u8,
                key_len: usize,
                value: *const u8,
                value_len: usize,
            ) -> u32;
            pub fn proxy_send_local_response(
                status: u32,
                details: *const u8,
                details_len: usize,
                body: *const u8,
                body_len: usize,
                headers: *const u8,
                headers_len: usize,
                grpc_status: i32,
            ) -> u32;
            pub fn proxy_get_property(
                path: *const u8,
                path_len: usize,
                out: *mut *mut u8,
                out_len: *mut usize,
            ) -> u32;
            pub fn proxy_get_shared_data(
                key: *const u8,
                key_len: usize,
                out: *mut *mut u8,
                out_len: *mut usize,
                cas: *mut u32,
            ) -> u32;
            pub fn proxy_set_shared_data(
                key: *const u8,
                key_len: usize,
                value: *const u8,
                value_len: usize,
                cas: u32,
            ) -> u32;
            pub fn proxy_define_metric(kind: u32, name: *const u8, name_len: usize, out: *mut u32) -> u32;
            pub fn proxy_increment_metric(id: u32, offset: i64) -> u32;
            pub fn proxy_record_metric(id: u32, value: u64) -> u32;
            pub fn proxy_continue_stream(stream: u32) -> u32;
        }
    }

    fn owned(rc: u32, ptr: *mut u8, len: usize) -> Option<HostBuf> {
        if rc != status::OK {
            return None;
        }
        // SAFETY: on OK the host allocated `len` bytes through proxy_on_memory_allocate (or left null).
        unsafe { HostBuf::from_raw(ptr, len) }
    }

    pub fn log(level: u32, msg: &str) {
        // SAFETY: pointer and length describe a live slice.
        unsafe { sys::proxy_log(level, msg.as_ptr(), msg.len()) };
    }

    /// Wall-clock time from the host (std::time does not work on wasm32 under Envoy); 0 on failure.
    pub fn now_ns() -> u64 {
        let mut t = 0u64;
        // SAFETY: `t` is a valid u64 out-pointer.
        let rc = unsafe { sys::proxy_get_current_time_nanoseconds(&mut t) };
        if rc == status::OK {
            t
        } else {
            0
        }
    }

    pub fn set_tick_period_ms(ms: u32) -> bool {
        // SAFETY: plain value call.
        unsafe { sys::proxy_set_tick_period_milliseconds(ms) == status::OK }
    }

    pub fn buffer(kind: u32, start: usize, max: usize) -> Option<HostBuf> {
        let (mut p, mut n) = (std::ptr::null_mut(), 0usize);
        // SAFETY: out-pointers are valid locals.
        let rc = unsafe { sys::proxy_get_buffer_bytes(kind, start, max, &mut p, &mut n) };
        owned(rc, p, n)
    }

    pub fn header(map: u32, key: &str) -> Option<HostBuf> {
        let (mut p, mut n) = (std::ptr::null_mut(), 0usize);
        // SAFETY: key slice is live; out-pointers are valid locals.
        let rc = unsafe { sys::proxy_get_header_map_value(map, key.as_ptr(), key.len(), &mut p, &mut n) };
        owned(rc, p, n)
    }

    pub fn header_pairs(map: u32) -> Option<HostBuf> {
        let (mut p, mut n) = (std::ptr::null_mut(), 0usize);
        // SAFETY: out-pointers are valid locals.
        let rc = unsafe { sys::proxy_get_header_map_pairs(map, &mut p, &mut n) };
        owned(rc, p, n)
    }

    pub fn add_header(map: u32, key: &str, value: &[u8]) -> bool {
        // SAFETY: both slices are live.
        unsafe {
            sys::proxy_add_header_map_value(map, key.as_ptr(), key.len(), value.as_ptr(), value.len())
                == status::OK
        }
    }

    pub fn replace_header(map: u32, key: &str, value: &[u8]) -> bool {
        // SAFETY: both slices are live.
        unsafe {
            sys::proxy_replace_header_map_value(map, key.as_ptr(), key.len(), value.as_ptr(), value.len())
                == status::OK
        }
    }

    /// Replies locally; `headers` is an [`encode_pairs`](super::encode_pairs) map.
    pub fn send_local_response(code: u32, details: &str, body: &[u8], headers: &[u8]) -> bool {
        // SAFETY: all slices are live for the call.
        unsafe {
            sys::proxy_send_local_response(
                code,
                details.as_ptr(),
                details.len(),
                body.as_ptr(),
                body.len(),
                headers.as_ptr(),
                headers.len(),
                -1,
            ) == status::OK
        }
    }

    /// Reads a property; `path` segments are joined with NUL bytes (e.g. `b"xds\0route_name"`).
    pub fn property(path: &[u8]) -> Option<HostBuf> {
        let (mut p, mut n) = (std::ptr::null_mut(), 0usize);
        // SAFETY: path slice is live; out-pointers are valid locals.
        let rc = unsafe { sys::proxy_get_property(path.as_ptr(), path.len(), &mut p, &mut n) };
        owned(rc, p, n)
    }

    /// Shared-data read: `Ok(Some((value, cas)))`, `Ok(None)` when the key does not exist, `Err(status)`.
    pub fn shared_get(key: &str) -> Result<Option<(HostBuf, u32)>, u32> {
        let (mut p, mut n, mut cas) = (std::ptr::null_mut(), 0usize, 0u32);
        // SAFETY: key slice is live; out-pointers are valid locals.
        let rc = unsafe { sys::proxy_get_shared_data(key.as_ptr(), key.len(), &mut p, &mut n, &mut cas) };
        match rc {
            status::OK => Ok(owned(rc, p, n).map(|b| (b, cas)).or_else(|| {
                // An empty value comes back as a null pointer; hand out an empty buffer.
                let q = super::allocate(0);
                // SAFETY: `q` comes from `allocate`.
                unsafe { HostBuf::from_raw(q, 0) }.map(|b| (b, cas))
            })),
            status::NOT_FOUND => Ok(None),
            other => Err(other),
        }
    }

    /// Shared-data write; `cas` 0 writes unconditionally. `Err(CAS_MISMATCH)` when someone else won.
    pub fn shared_set(key: &str, value: &[u8], cas: u32) -> Result<(), u32> {
        // SAFETY: both slices are live.
        let rc = unsafe { sys::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
        if rc == status::OK {
            Ok(())
        } else {
            Err(rc)
        }
    }

    pub fn define_metric(kind: u32, name: &str) -> Option<u32> {
        let mut id = 0u32;
        // SAFETY: name slice is live; `id` is a valid out-pointer.
        let rc = unsafe { sys::proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) };
        if rc == status::OK {
            Some(id)
        } else {
            None
        }
    }

    pub fn increment_metric(id: u32, by: i64) {
        // SAFETY: plain value call.
        unsafe { sys::proxy_increment_metric(id, by) };
    }

    pub fn record_metric(id: u32, value: u64) {
        // SAFETY: plain value call.
        unsafe { sys::proxy_record_metric(id, value) };
    }

    pub fn continue_stream(stream: u32) -> bool {
        // SAFETY: plain value call.
        unsafe { sys::proxy_continue_stream(stream) == status::OK }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"x-mesh-circuit", b"open"), (b"retry-after", b"1"), (b"", b"")];
        let bytes = encode_pairs(&pairs);
        let back = decode_pairs(&bytes).expect("well-formed map");
        assert_eq!(back, pairs, "expected the pairs back, got {:?}", back);
    }

    #[test]
    fn decode_rejects_truncated_maps() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"a", b"bc")];
        let bytes = encode_pairs(&pairs);
        for cut in 0..bytes.len() - 1 {
            assert!(decode_pairs(&bytes[..cut]).is_none(), "expected None for {} bytes", cut);
        }
        let huge = [0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0];
        assert!(decode_pairs(&huge).is_none(), "expected None for a huge count");
    }

    #[test]
    fn allocate_and_own() {
        let p = allocate(16);
        assert!(!p.is_null());
        // SAFETY: freshly allocated 16 bytes.
        unsafe { std::ptr::write_bytes(p, 7, 16) };
        let buf = unsafe { HostBuf::from_raw(p, 16) }.expect("owned");
        assert_eq!(buf.bytes(), &[7u8; 16][..]);
    }
}
