//! `chaos [--duration 10m] [--seed N] [--nodes 3] [--store embedded|mongo]
//! [--history FILE] [--settle 3m]`: one fault campaign (see
//! `integration_tests::chaos`); exits 1 when an invariant was violated.
//! Run it through `scripts/chaos.sh`, which builds what it starts.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use integration_tests::chaos::{Options, cluster::StoreKind, run};

fn duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 90s or 10m"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{text}`: the units are s, m and h")),
    }
}

fn options() -> Result<Options, String> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut options = Options {
        seed,
        duration: Duration::from_secs(600),
        nodes: 3,
        store: None,
        history: PathBuf::from("chaos-history.jsonl"),
        settle: Duration::from_secs(180),
        // Apart from the CI campaigns' (10.96.1 and 10.97.1).
        bridge: ("chaosbr".into(), "10.95.1".into()),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seed" => {
                options.seed = value()?
                    .parse()
                    .map_err(|_| "--seed takes a number".to_owned())?
            }
            "--duration" => options.duration = duration(&value()?)?,
            "--settle" => options.settle = duration(&value()?)?,
            "--nodes" => {
                options.nodes = value()?
                    .parse()
                    .map_err(|_| "--nodes takes a number".to_owned())?;
                if !(1..=20).contains(&options.nodes) {
                    return Err("--nodes takes 1 to 20".into());
                }
            }
            "--store" => {
                options.store = Some(match value()?.as_str() {
                    "embedded" => StoreKind::Embedded,
                    "mongo" => StoreKind::Mongo,
                    other => return Err(format!("--store {other}: embedded or mongo")),
                });
            }
            "--history" => options.history = PathBuf::from(value()?),
            "-h" | "--help" => {
                return Err("usage: chaos [--duration 10m] [--seed N] [--nodes 3] [--store embedded|mongo] [--history FILE] [--settle 3m]".into());
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(options)
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    println!(
        "chaos: seed {} for {:?} on {} nodes; history in {}",
        options.seed,
        options.duration,
        options.nodes,
        options.history.display()
    );
    let report = run(options).await;
    print!("{}", report.summary());
    if report.violations.is_empty() && report.converged_after.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
