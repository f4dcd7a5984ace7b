//! The baseline filter: it enters the WASM VM for every HTTP callback Envoy makes and returns
//! Continue, nothing else. `meshpilot perf route` runs it beside the real filters so the cost of
//! meshpilot's filter logic can be told apart from the cost of entering the VM at all.

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

// A reactor module: Envoy calls `_initialize` once after instantiation. Referencing the linker's
// constructor function here also stops the linker from wrapping every export in a constructor call,
// which would run WASI start-up code (refused inside proxy_on_memory_allocate) on every callback.
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
    match std::alloc::Layout::from_size_align(size.max(1), 1) {
        // SAFETY: non-zero size layout.
        Ok(layout) => unsafe { std::alloc::alloc(layout) },
        Err(_) => std::ptr::null_mut(),
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_id: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_id: u32, _size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_root_id: u32, _size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(_context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_log(_context_id: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_done(_context_id: u32) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context_id: u32) {}
