#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitferry_fuzz::targets::peer_cert::TARGET.fuzz(data));
