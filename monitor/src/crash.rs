//! Crash points for tests. With `ADDONS_MONITOR_CRASH_AT=<point>` set, the
//! monitor SIGKILLs itself when it reaches `<point>`, so a test can check
//! what a crash at exactly that step of a swap or a restore leaves behind
//! and that the next monitor converges from it. Unset, each point costs one
//! environment lookup.

/// Dies like a SIGKILLed process if the environment names `point`.
pub(crate) fn point(point: &str) {
    if std::env::var("ADDONS_MONITOR_CRASH_AT").as_deref() == Ok(point) {
        tracing::warn!(point, "crashing at a crash point, as asked");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
