//! The price list behind `meshpilot perf route --instructions N --probes`: a filter that makes one
//! kind of host call a configured number of times per request and nothing else. Its configuration
//! is `<call> = <times>`, one line, where `<call>` is one of
//!
//! - `route`, `cluster`: the `xds.route_name` / `xds.cluster_name` properties (on the request),
//! - `path`: the `:path` request header, `missing`: a request header that is never there,
//! - `status`: the `:status` response header, `missing_response`: a response header never there,
//! - `clock`: the host clock (a call that returns a scalar, no allocation in the module).
//!
//! An empty configuration makes no call: the cost of a filter with these four callbacks. Comparing
//! a configuration with the empty one, divided by `<times>`, gives one call's price.

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Call {
    None,
    Route,
    Cluster,
    Path,
    Missing,
    Status,
    MissingResponse,
    Clock,
}

/// `<call> = <times>` (at most 1000), or nothing; `None` for anything else.
pub fn parse(text: &str) -> Option<(Call, u32)> {
    let text = text.trim();
    if text.is_empty() {
        return Some((Call::None, 0));
    }
    let (name, times) = text.split_once('=')?;
    let times: u32 = times.trim().parse().ok().filter(|n| *n <= 1000)?;
    let call = match name.trim() {
        "route" => Call::Route,
        "cluster" => Call::Cluster,
        "path" => Call::Path,
        "missing" => Call::Missing,
        "status" => Call::Status,
        "missing_response" => Call::MissingResponse,
        "clock" => Call::Clock,
        _ => return None,
    };
    Some((call, times))
}

#[cfg(target_arch = "wasm32")]
mod glue {
    use std::cell::Cell;

    use meshpilot_abi::{buffer, host, map};

    use super::{parse, Call};

    thread_local! {
        static PLAN: Cell<(Call, u32)> = Cell::new((Call::None, 0));
    }

    /// Makes the call `times` times; returns a value that depends on every result, so none is skipped.
    fn run(call: Call, times: u32) -> usize {
        let mut n = 0usize;
        for _ in 0..times {
            n = n.wrapping_add(match call {
                Call::Route => host::property(b"xds\0route_name").map_or(0, |b| b.bytes().len()),
                Call::Cluster => host::property(b"xds\0cluster_name").map_or(0, |b| b.bytes().len()),
                Call::Path => host::header(map::REQUEST_HEADERS, ":path").map_or(0, |b| b.bytes().len()),
                Call::Missing => host::header(map::REQUEST_HEADERS, "x-meshpilot-probe-absent").map_or(0, |b| b.bytes().len()),
                Call::Status => host::header(map::RESPONSE_HEADERS, ":status").map_or(0, |b| b.bytes().len()),
                Call::MissingResponse => host::header(map::RESPONSE_HEADERS, "x-meshpilot-probe-absent").map_or(0, |b| b.bytes().len()),
                Call::Clock => (host::now_ns() & 1) as usize,
                Call::None => 0,
            });
        }
        n
    }

    meshpilot_abi::reactor_exports!();

    #[no_mangle]
    pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_id: u32) {}

    #[no_mangle]
    pub extern "C" fn proxy_on_vm_start(_root_id: u32, _size: usize) -> u32 {
        1
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_configure(_root_id: u32, size: usize) -> u32 {
        let raw = if size == 0 { None } else { host::buffer(buffer::PLUGIN_CONFIGURATION, 0, size) };
        let text = raw.as_ref().map(|b| String::from_utf8_lossy(b.bytes()).into_owned()).unwrap_or_default();
        match parse(&text) {
            Some(plan) => {
                PLAN.with(|p| p.set(plan));
                1
            }
            None => {
                host::log(meshpilot_abi::level::ERROR, &format!("meshpilot probe: bad configuration {:?}", text));
                0
            }
        }
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_request_headers(_context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
        let (call, times) = PLAN.with(|p| p.get());
        if matches!(call, Call::Route | Call::Cluster | Call::Path | Call::Missing | Call::Clock) && run(call, times) == usize::MAX {
            return 1; // never: keeps the results live
        }
        0
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_response_headers(_context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
        let (call, times) = PLAN.with(|p| p.get());
        if matches!(call, Call::Status | Call::MissingResponse) && run(call, times) == usize::MAX {
            return 1;
        }
        0
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_delete(_context_id: u32) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        assert_eq!(parse(""), Some((Call::None, 0)));
        assert_eq!(parse("route = 10\n"), Some((Call::Route, 10)));
        assert_eq!(parse("missing_response=3"), Some((Call::MissingResponse, 3)));
        for bad in ["route", "route = x", "route = 1001", "teleport = 1", "= 3", "route = -1"] {
            assert_eq!(parse(bad), None, "{:?} must be refused", bad);
        }
    }
}
