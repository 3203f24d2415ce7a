//! `cargo fuzz run http1_head`: see `waymark_agent::fuzzing::http1_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waymark_agent::fuzzing::http1_head(data));
