//! An Oakestra descriptor (JSON or YAML) as the CLI reads it, then
//! validated as the marketplace would. Nothing may panic.

#![no_main]

use addons_descriptor::Descriptor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(addon) = oak_addons::oakestra::parse_descriptor(text, "fuzz") {
        let _ = addons_descriptor::validate(&Descriptor::from_proto(addon));
    }
});
