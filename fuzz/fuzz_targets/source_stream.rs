#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitferry_fuzz::targets::source_stream::TARGET.fuzz(data));
