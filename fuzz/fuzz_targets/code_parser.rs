//! The session-code parser on arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_session::SessionCode;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(code) = SessionCode::parse(s)
    {
        // Whatever was found parses back to itself from its own display form.
        assert_eq!(SessionCode::parse(&code.grouped()).ok(), Some(code));
    }
});
