//! The admin API's query strings (`?filter=…&format=…`): percent-decoding,
//! first-key-wins lookup and the `filter` regex, which the input chooses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodeway::admin::query::{Query, percent_encode};

fuzz_target!(|input: &[u8]| {
    let Ok(raw) = std::str::from_utf8(input) else {
        return;
    };
    let query = Query::parse(Some(raw));
    let _ = query.regex("filter");
    if let Some(value) = query.get("format") {
        // Encoding what was decoded gives a query that decodes to the same.
        let again = Query::parse(Some(&format!("format={}", percent_encode(value))));
        assert_eq!(again.get("format"), Some(value));
    }
});
