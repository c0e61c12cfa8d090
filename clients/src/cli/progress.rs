//! `--wait` for installs and uninstalls: live progress on a terminal (a bar
//! for the image bytes pulled, a spinner per service with its phase), one
//! line per change otherwise.

use std::{collections::BTreeMap, io::IsTerminal as _, time::Duration};

use futures::StreamExt as _;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oak_addons::{
    ManagerClient,
    proto::engine::v1::{self as epb, InstallationStatus, ServicePhase},
};

use super::{EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, Failure, failed, output};

/// Where an install stands for `--wait`.
fn settled(installation: &epb::Installation) -> Option<u8> {
    match installation.status() {
        InstallationStatus::Active => Some(EXIT_OK),
        InstallationStatus::Failed => Some(EXIT_FAILED),
        // Partially active is final only once nothing is still on its way.
        InstallationStatus::PartiallyActive
            if installation
                .services
                .iter()
                .all(|s| matches!(s.phase(), ServicePhase::Running | ServicePhase::Failed)) =>
        {
            Some(EXIT_PARTIAL)
        }
        _ => None,
    }
}

/// Live display of an installation's progress.
struct Display {
    live: Option<(MultiProgress, ProgressBar, BTreeMap<String, ProgressBar>)>,
    last_line: String,
}

impl Display {
    fn new() -> Self {
        let live = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let pull = multi.add(ProgressBar::new(0));
            pull.set_style(
                ProgressStyle::with_template(
                    "pull     [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            (multi, pull, BTreeMap::new())
        });
        Self {
            live,
            last_line: String::new(),
        }
    }

    fn show(&mut self, installation: &epb::Installation) {
        let Some((multi, pull, spinners)) = self.live.as_mut() else {
            // Not a terminal: one line per change.
            let services: Vec<String> = installation
                .services
                .iter()
                .map(|s| format!("{}={}", s.service_name, output::phase(s)))
                .collect();
            let line = output::shown(&format!(
                "{} {} {}",
                output::installation_status(installation),
                services.join(" "),
                installation.status_message
            ));
            if line != self.last_line {
                eprintln!("{line}");
                self.last_line = line;
            }
            return;
        };
        let done: u64 = installation
            .services
            .iter()
            .map(|s| s.pull_bytes_done)
            .sum();
        let total: u64 = installation
            .services
            .iter()
            .map(|s| s.pull_bytes_total.max(s.pull_bytes_done))
            .sum();
        if total.max(done) == 0 {
            // Nothing pulled (yet): no size to show a bar against.
            pull.unset_length();
        } else {
            pull.set_length(total.max(done));
        }
        pull.set_position(done);
        for service in &installation.services {
            let spinner = spinners
                .entry(service.service_name.clone())
                .or_insert_with(|| {
                    let spinner = multi.add(ProgressBar::new_spinner());
                    spinner.set_style(
                        ProgressStyle::with_template("{spinner} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    spinner.enable_steady_tick(Duration::from_millis(120));
                    spinner
                });
            spinner.set_message(format!(
                "{:<20} {:<9} {}",
                service.service_name,
                output::phase(service),
                service.reason
            ));
            if matches!(
                service.phase(),
                ServicePhase::Running | ServicePhase::Failed
            ) {
                spinner.disable_steady_tick();
            }
        }
    }

    fn finish(self) {
        if let Some((multi, pull, spinners)) = self.live {
            pull.finish();
            for spinner in spinners.values() {
                spinner.finish();
            }
            let _ = multi.clear();
        }
    }
}

/// What the watch of an installation saw.
enum Seen<'a> {
    /// Its current state.
    Now(&'a epb::Installation),
    /// It was purged; its last state.
    Deleted(&'a epb::Installation),
}

/// Shows an installation's changes until `finished` returns a result for
/// what was seen and the status has held for `settle`, or `patience` runs
/// out (`waiting_for` says for what).
async fn follow<T>(
    client: &ManagerClient,
    installation: epb::Installation,
    patience: Duration,
    settle: Duration,
    waiting_for: &str,
    mut finished: impl FnMut(Seen<'_>) -> Option<Result<T, Failure>>,
) -> Result<T, Failure> {
    let id = installation.id.clone();
    let mut display = Display::new();
    let mut events = Box::pin(client.watch(vec![id.clone()]));
    let outcome = tokio::time::timeout(patience, async {
        let mut current = installation;
        // The final-looking status and since when it holds.
        let mut holding: Option<(i32, std::time::Instant)> = None;
        loop {
            display.show(&current);
            let next = match finished(Seen::Now(&current)) {
                Some(result) if settle.is_zero() => return result,
                Some(result) => {
                    // A crash-looping service looks RUNNING for a moment:
                    // the status has to hold before it counts.
                    let since = match holding {
                        Some((status, since)) if status == current.status => since,
                        _ => std::time::Instant::now(),
                    };
                    holding = Some((current.status, since));
                    let left = settle.saturating_sub(since.elapsed());
                    match tokio::time::timeout(left, events.next()).await {
                        Err(_) => return result,
                        Ok(next) => next,
                    }
                }
                None => {
                    holding = None;
                    events.next().await
                }
            };
            let broken = match next {
                Some(Ok(event)) if event.deleted => {
                    if let Some(result) = finished(Seen::Deleted(&event.installation)) {
                        return result;
                    }
                    format!("installation {id} was deleted")
                }
                Some(Ok(event)) => {
                    current = event.installation;
                    continue;
                }
                // Purged between the call and the watch.
                Some(Err(oak_addons::ClientError::Status(status)))
                    if status.code() == tonic::Code::NotFound =>
                {
                    if let Some(result) = finished(Seen::Deleted(&current)) {
                        return result;
                    }
                    format!("installation {id} was deleted")
                }
                Some(Err(err)) => return Err(failed(&format!("watching installation {id}"))(err)),
                None => format!("watching installation {id}: the stream ended"),
            };
            return Err(Failure::error(broken));
        }
    })
    .await;
    display.finish();
    outcome.map_err(|_| {
        Failure::error(format!(
            "installation {id} {waiting_for} within {patience:?}"
        ))
    })?
}

/// What `--wait` follows an installation to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// It settles (install): the exit code says how.
    Settled,
    /// Its rollout ends (upgrade, rollback): 0 when the new release runs
    /// everywhere, 3 when it was rolled back (or the installation failed),
    /// 4 when it ended partially active. The status message shows each
    /// node's progress as it changes.
    RolledOut,
    /// It is DISABLED or purged (uninstall).
    Removed,
}

/// An installation a command made or changed: printed, or with `until`
/// (`--wait`) followed there, printed then and its exit code returned.
pub async fn installation(
    client: &ManagerClient,
    installation: epb::Installation,
    until: Option<Until>,
    format: output::Format,
    (patience, settle): (Duration, Duration),
) -> Result<u8, Failure> {
    let (waiting_for, exit_code): (&str, fn(&epb::Installation) -> Option<u8>) = match until {
        None => {
            output::installations(&[installation], format, false).map_err(failed("output"))?;
            return Ok(EXIT_OK);
        }
        Some(Until::Removed) => return wait_removed(client, installation, format, patience).await,
        Some(Until::Settled) => ("did not settle", settled),
        Some(Until::RolledOut) => ("did not finish its rollout", |current| {
            match current.status() {
                InstallationStatus::Upgrading => None,
                InstallationStatus::RolledBack => Some(EXIT_FAILED),
                _ => settled(current),
            }
        }),
    };
    let timing = (patience, settle);
    wait_until(client, installation, format, timing, waiting_for, exit_code).await
}

/// Follows an installation until `exit_code` has a code for it (and it
/// held for `settle`), then prints it; a code other than 0 also says why
/// on stderr.
async fn wait_until(
    client: &ManagerClient,
    installation: epb::Installation,
    format: output::Format,
    (patience, settle): (Duration, Duration),
    waiting_for: &str,
    exit_code: fn(&epb::Installation) -> Option<u8>,
) -> Result<u8, Failure> {
    let (installation, code) = follow(
        client,
        installation,
        patience,
        settle,
        waiting_for,
        |seen| match seen {
            Seen::Now(current) => exit_code(current).map(|code| Ok((current.clone(), code))),
            Seen::Deleted(_) => None,
        },
    )
    .await?;
    output::installations(std::slice::from_ref(&installation), format, false)
        .map_err(failed("output"))?;
    if code != EXIT_OK {
        eprintln!(
            "error: installation {} is {}: {}",
            installation.id,
            output::installation_status(&installation),
            output::shown(&installation.status_message)
        );
    }
    Ok(code)
}

/// Follows an uninstall until DISABLED (or purged).
async fn wait_removed(
    client: &ManagerClient,
    installation: epb::Installation,
    format: output::Format,
    patience: Duration,
) -> Result<u8, Failure> {
    let installation = follow(
        client,
        installation,
        patience,
        Duration::ZERO,
        "was not removed",
        |seen| match seen {
            Seen::Now(current) if current.status() == InstallationStatus::Disabled => {
                Some(Ok(current.clone()))
            }
            Seen::Now(_) => None,
            Seen::Deleted(last) => Some(Ok(last.clone())),
        },
    )
    .await?;
    if format == output::Format::Table {
        println!("uninstalled {}", installation.id);
    } else {
        output::installations(std::slice::from_ref(&installation), format, false)
            .map_err(failed("output"))?;
    }
    Ok(EXIT_OK)
}
