//! Protocol detection on every prefix of the input: it never panics, asks
//! for more bytes only while a decision is still open (at most the HTTP/2
//! preface's length), and never changes its mind once it has decided.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodeway::proxy::outbound::sniff::classify;

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`
const H2_PREFACE_LEN: usize = 24;

fuzz_target!(|input: &[u8]| {
    let mut decided = None;
    for end in 0..=input.len() {
        let verdict = classify(&input[..end]);
        match (decided, verdict) {
            (None, None) => assert!(end <= H2_PREFACE_LEN, "undecided after {end} bytes"),
            (None, Some(v)) => decided = Some(v),
            (Some(_), None) => panic!("undecided again after {end} bytes"),
            (Some(before), Some(now)) => assert_eq!(before, now, "changed its mind at {end} bytes"),
        }
    }
});
