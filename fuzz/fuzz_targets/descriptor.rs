//! A published addon as the marketplace reads it: protobuf bytes decoded,
//! converted to the domain descriptor, validated, and converted to both
//! protobuf forms again. Nothing may panic.

#![no_main]

use addons_descriptor::Descriptor;
use libfuzzer_sys::fuzz_target;
use oakestra_addons_proto::marketplace::v1 as mpb;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(addon) = mpb::Addon::decode(data) else {
        return;
    };
    let descriptor = Descriptor::from_proto(addon);
    let _ = addons_descriptor::validate(&descriptor);
    let _ = descriptor.clone().into_proto();
    let _ = descriptor.into_snapshot();
});
