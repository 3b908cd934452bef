//! Any bytes as a completions or chat body: parsing and the request-level checks either produce
//! settings or an `ApiError`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_server::openai::limits::InputLimits;
use quiver_server::openai::request::{parse_chat, parse_completion};

fuzz_target!(|body: &[u8]| {
    let limits = InputLimits::default();
    if let Ok(req) = parse_completion(body) {
        let _ = req.settings(&limits);
    }
    if let Ok(req) = parse_chat(body) {
        let _ = req.settings(&limits);
    }
});
