//! The desired state as a node takes it from the link: decoded, assembled,
//! checked by the monitor's intake. Nothing may panic, and whatever the
//! intake lets through names no path outside the state dir: its ids and
//! names become files and directories there.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    addons_monitor::intake::fuzzing::desired(data);
});
