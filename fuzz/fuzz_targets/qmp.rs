#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitferry_fuzz::targets::qmp::TARGET.fuzz(data));
