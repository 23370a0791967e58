//! Bytes as a configuration file: parsing, validation and resolution into a
//! snapshot must end in a snapshot or a list of problems, never a panic, an
//! allocation the input chose, or a hang (libFuzzer's -timeout).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodeway::config::{LoadOptions, load_str};

fuzz_target!(|input: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(input) else {
        return;
    };
    let opts = LoadOptions {
        node_name: Some("node-a".into()),
        ..LoadOptions::default()
    };
    match load_str("fuzz.yaml", yaml, &opts) {
        Ok(_) => {}
        // Every problem names where it is.
        Err(problems) => assert!(!problems.is_empty(), "an error without a problem"),
    }
});
