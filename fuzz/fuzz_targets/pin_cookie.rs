#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sessionlb_fuzz::targets::pin_cookie(data));
