//! A message on the monitor link as the manager reads it: a hello or a
//! status report, decoded and checked before anything is stored. Nothing
//! may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    addons_engine::link::fuzzing::message(data);
    addons_engine::link::fuzzing::hello(data);
    addons_engine::link::fuzzing::report(data);
});
