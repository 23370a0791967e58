//! Raw bytes from an enrolled client pod through the whole outbound path:
//! protocol sniffing, HTTP/1.1 or HTTP/2 (or a TCP relay), routing, retries,
//! pools, the upstream and the access log. A crash is a panic in any proxy
//! task, or a connection the proxy has not finished 5 s after its client
//! closed. The client waits for answers until the proxy has been quiet for
//! 10 ms, then closes.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nodeway_fuzz::Harness;

fuzz_target!(|input: &[u8]| {
    Harness::get().exchange(input, Duration::from_millis(10));
});
