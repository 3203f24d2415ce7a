//! `cargo fuzz run config`: see `waymark_agent::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waymark_agent::fuzzing::config(data));
