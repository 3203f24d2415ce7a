//! `cargo fuzz run tunnel_connect`: see `waymark_agent::fuzzing::tunnel_connect`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waymark_agent::fuzzing::tunnel_connect(data));
