//! `cargo fuzz run detect`: see `waymark_agent::fuzzing::detect`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waymark_agent::fuzzing::detect(data));
