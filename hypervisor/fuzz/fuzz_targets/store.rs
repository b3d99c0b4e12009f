//! libFuzzer entry point of the `store` target: see `hyp_fuzz::store`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hyp_fuzz::store::run(data));
