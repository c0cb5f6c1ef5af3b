#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitferry_fuzz::targets::store_file::TARGET.fuzz(data));
