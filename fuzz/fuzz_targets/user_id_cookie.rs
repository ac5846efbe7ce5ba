#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sessionlb_fuzz::targets::user_id_cookie(data));
