//! A message on the monitor link as the manager reads it: a hello or a
//! status report, decoded and checked before anything is stored. Nothing
//! may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    addons_manager::link::fuzzing::message(data);
    addons_manager::link::fuzzing::hello(data);
    addons_manager::link::fuzzing::report(data);
});
