//! libFuzzer entry point of the `stage2_model` target: see `hyp_fuzz::stage2_model`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hyp_fuzz::stage2_model::run(data));
