//! libFuzzer entry point of the `validators` target: see `hyp_fuzz::validators`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hyp_fuzz::validators::run(data));
