#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitferry_fuzz::targets::dest_stream::TARGET.fuzz(data));
