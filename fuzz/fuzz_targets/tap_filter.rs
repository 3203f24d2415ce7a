//! `cargo fuzz run tap_filter`: see `waymark_agent::fuzzing::tap_filter`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waymark_agent::fuzzing::tap_filter(data));
