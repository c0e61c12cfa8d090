//! What a campaign did and saw, as it happens: one JSON line per completed
//! operation (its invoke and complete times), per fault (its start and
//! end) and per invariant violation, written as they complete so a run
//! that dies leaves its history; and the summary made of them.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::json;

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It took effect.
    Ok,
    /// The server refused it (a definite no): its gRPC code and message.
    Refused(String, String),
    /// No answer says whether it took effect (the server was down, the
    /// connection broke): its request id makes a retry safe.
    Indeterminate,
}

impl Outcome {
    fn name(&self) -> String {
        match self {
            Self::Ok => "ok".to_owned(),
            Self::Refused(code, _) => format!("refused:{code}"),
            Self::Indeterminate => "indeterminate".to_owned(),
        }
    }

    /// The outcome of a gRPC answer: unavailable, cancelled or past its
    /// deadline is indeterminate, any other error a refusal.
    pub fn of<T>(result: &Result<T, tonic::Status>) -> Self {
        match result {
            Ok(_) => Self::Ok,
            Err(status) => match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown => Self::Indeterminate,
                code => Self::Refused(format!("{code:?}"), status.message().to_owned()),
            },
        }
    }
}

/// The history of one campaign.
#[derive(Debug)]
pub struct History {
    start: Instant,
    file: Mutex<std::io::BufWriter<std::fs::File>>,
    tally: Mutex<Tally>,
}

#[derive(Debug, Default)]
struct Tally {
    operations: BTreeMap<(String, String), u64>,
    faults: BTreeMap<String, u64>,
    violations: Vec<String>,
    last_fault_end: Option<Duration>,
    disturbed: Vec<Disturbance>,
}

/// A time a target was under a fault, or restarted by the workload.
#[derive(Debug, Clone)]
pub struct Disturbance {
    /// The node id, or the server's name.
    pub target: String,
    /// When it began, since the campaign's start.
    pub start: Duration,
    /// When it ended.
    pub end: Duration,
    /// Whether the workload did it (a relabel), not a fault.
    pub by_workload: bool,
}

impl History {
    /// A history written to `path` (created, or truncated).
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            start: Instant::now(),
            file: Mutex::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
            tally: Mutex::default(),
        })
    }

    /// Time since the campaign started.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    fn write(&self, line: serde_json::Value) {
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(file, "{line}");
        let _ = file.flush();
    }

    /// Records the first line: what the campaign is.
    pub fn header(&self, fields: serde_json::Value) {
        self.write(json!({"type": "campaign", "t": 0, "campaign": fields}));
    }

    /// Records an operation of `kind` invoked at `invoke` that ended now
    /// with `outcome`; `detail` says what it was about.
    pub fn operation(&self, kind: &str, invoke: Duration, outcome: &Outcome, detail: &str) {
        let complete = self.now();
        let reason = match outcome {
            Outcome::Refused(_, message) => message.as_str(),
            _ => "",
        };
        self.write(json!({
            "type": "op", "kind": kind, "invoke": Self::ms(invoke),
            "complete": Self::ms(complete), "outcome": outcome.name(), "detail": detail,
            "reason": reason,
        }));
        let mut tally = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *tally
            .operations
            .entry((kind.to_owned(), outcome.name()))
            .or_default() += 1;
    }

    /// Records a fault of `kind` on `target` from `start` to now.
    pub fn fault(&self, kind: &str, target: &str, start: Duration) {
        let end = self.now();
        self.write(json!({
            "type": "fault", "kind": kind, "target": target,
            "start": Self::ms(start), "end": Self::ms(end),
        }));
        let mut tally = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *tally.faults.entry(kind.to_owned()).or_default() += 1;
        tally.last_fault_end = Some(tally.last_fault_end.map_or(end, |last| last.max(end)));
        tally.disturbed.push(Disturbance {
            target: target.to_owned(),
            start,
            end,
            by_workload: false,
        });
    }

    /// Records that the workload disturbed `target` from `start` to now
    /// (a node's monitor restarted with new labels).
    pub fn disturbed(&self, target: &str, start: Duration) {
        let end = self.now();
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .disturbed
            .push(Disturbance {
                target: target.to_owned(),
                start,
                end,
                by_workload: true,
            });
    }

    /// Whether the workload relabelled node `target` at any time from
    /// `start` to `end`.
    pub fn was_relabelled(&self, target: &str, start: Duration, end: Duration) -> bool {
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .disturbed
            .iter()
            .any(|d| d.by_workload && d.target == target && d.start <= end && start <= d.end)
    }

    /// Whether `target` was disturbed (a fault, or a restart by the
    /// workload) at any time from `start` to `end`.
    pub fn was_disturbed(&self, target: &str, start: Duration, end: Duration) -> bool {
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .disturbed
            .iter()
            .any(|d| d.target == target && d.start <= end && start <= d.end)
    }

    /// Records an invariant violation.
    pub fn violation(&self, invariant: &str, what: &str) {
        self.write(json!({
            "type": "violation", "t": Self::ms(self.now()),
            "invariant": invariant, "what": what,
        }));
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .violations
            .push(format!("{invariant}: {what}"));
    }

    /// Records a note (a phase, a figure).
    pub fn note(&self, what: &str, fields: serde_json::Value) {
        self.write(
            json!({"type": "note", "t": Self::ms(self.now()), "what": what, "fields": fields}),
        );
    }

    /// Operations by kind and outcome.
    pub fn operations(&self) -> BTreeMap<(String, String), u64> {
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .operations
            .clone()
    }

    /// Faults injected by kind.
    pub fn faults(&self) -> BTreeMap<String, u64> {
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .faults
            .clone()
    }

    /// Every violation recorded.
    pub fn violations(&self) -> Vec<String> {
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .violations
            .clone()
    }

    /// When the last fault ended.
    pub fn last_fault_end(&self) -> Option<Duration> {
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .last_fault_end
    }
}
