//! The operations of a campaign, chosen from the seed: publish versions,
//! install (with and without selectors), upgrade (to good, crashing and
//! unhealthy versions), roll back, uninstall (with and without purge) and
//! relabel nodes. Every call has a request id; one without an answer is
//! retried with the same id, and what each id's answers named is kept, for
//! the exactly-once check.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use oakestra_addons_proto::{
    engine::v1::{self as pb, addons_manager_service_client::AddonsManagerServiceClient},
    marketplace::v1::{self as mpb, marketplace_service_client::MarketplaceServiceClient},
};

use super::{
    cluster::Cluster,
    history::{History, Outcome},
    rng::Rng,
    swap,
};

/// How a published version behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Runs until stopped.
    Good,
    /// Exits with an error at once, every time.
    Crashes,
    /// Runs two seconds, then exits with an error, every time: its
    /// failures take long enough for a fault to fall among them.
    CrashesLater,
    /// Runs, and its health check always fails.
    Unhealthy,
    /// Writes its log as fast as a loop of `echo` goes, in bursts.
    FillsLogs,
    /// Exits 0 after a few seconds.
    Exits,
}

/// A version the campaign published.
#[derive(Debug, Clone)]
pub struct Published {
    /// The addon's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its marketplace id.
    pub id: String,
    /// How it behaves.
    pub behaviour: Behaviour,
    /// The privileges it needs.
    pub privileges: Vec<pb::Privilege>,
}

/// What the workload did that the checks need.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Each install request id and the installation ids its answers
    /// named (one, or none when no attempt was answered).
    pub installs: BTreeMap<String, Vec<String>>,
    /// Install requests that no attempt got an answer to.
    pub unanswered_installs: usize,
    /// Install requests sent again after their answer (a client that
    /// lost it) that were refused: each is a violation.
    pub refused_retries: Vec<String>,
}

/// The workload's state.
#[derive(Debug)]
pub struct Workload {
    cluster: Arc<Cluster>,
    history: Arc<History>,
    rng: Rng,
    published: Vec<Published>,
    next_version: u32,
    next_request: u64,
    /// What the checks need.
    pub ledger: Ledger,
}

/// The most installations not yet uninstalled: the nodes have two cores
/// between them all.
const MAX_LIVE: usize = 6;

/// The addons whose new versions the workload publishes, and upgrades
/// between. Each addon's service is named after it (the plugin's after the
/// core component it replaces): two installations of one addon would
/// provide the same service, which the manager refuses.
const UPGRADABLE: [&str; 4] = ["steady", "sturdy", "stable", swap::PLUGIN];

/// How many times a call without an answer is tried.
const ATTEMPTS: usize = 4;

impl Workload {
    /// A workload on `cluster`.
    pub fn new(cluster: Arc<Cluster>, history: Arc<History>, rng: Rng) -> Self {
        Self {
            cluster,
            history,
            rng,
            published: Vec::new(),
            next_version: 0,
            next_request: 0,
            ledger: Ledger::default(),
        }
    }

    /// Every version published so far.
    pub fn published(&self) -> &[Published] {
        &self.published
    }

    fn manager(&self) -> AddonsManagerServiceClient<tonic::transport::Channel> {
        AddonsManagerServiceClient::new(self.cluster.manager_channel())
    }

    fn marketplace(&self) -> MarketplaceServiceClient<tonic::transport::Channel> {
        MarketplaceServiceClient::new(self.cluster.marketplace_channel())
    }

    fn request_id(&mut self) -> String {
        self.next_request += 1;
        format!("chaos-{:016x}-{}", self.rng.next_u64(), self.next_request)
    }

    /// Publishes the first versions: two good ones of each upgradable
    /// addon ([`UPGRADABLE`]), whose versions the upgrades go between, and
    /// one of each other behaviour.
    pub async fn seed(&mut self) {
        for name in UPGRADABLE {
            for _ in 0..2 {
                self.publish(name, Behaviour::Good).await;
            }
        }
        for (name, behaviour) in [
            ("crashy", Behaviour::Crashes),
            ("flaky", Behaviour::CrashesLater),
            ("chatty", Behaviour::FillsLogs),
            ("brief", Behaviour::Exits),
        ] {
            self.publish(name, behaviour).await;
        }
    }

    /// Runs one operation, chosen from the seed.
    pub async fn step(&mut self) {
        let live = self.live().await;
        let full = live.as_ref().is_some_and(|live| live.len() >= MAX_LIVE);
        let weights = [
            1,                        // publish
            if full { 0 } else { 4 }, // install
            2,                        // upgrade
            1,                        // rollback
            if full { 5 } else { 2 }, // uninstall
            1,                        // relabel
            2,                        // read
        ];
        let live = live.unwrap_or_default();
        match self.rng.weighted(&weights) {
            0 => {
                let behaviour = *self.rng.pick(&[
                    Behaviour::Good,
                    Behaviour::Good,
                    Behaviour::Crashes,
                    Behaviour::CrashesLater,
                    Behaviour::Unhealthy,
                ]);
                let name = *self.rng.pick(&UPGRADABLE);
                self.publish(name, behaviour).await;
            }
            1 => self.install().await,
            2 => self.upgrade(&live).await,
            3 => self.rollback(&live).await,
            4 => self.uninstall(&live).await,
            5 => self.relabel().await,
            _ => self.read().await,
        }
    }

    /// The installations not uninstalled, as the manager lists them; none
    /// when it does not answer.
    async fn live(&self) -> Option<Vec<pb::Installation>> {
        let all = list_installations(&mut self.manager()).await.ok()?;
        Some(
            all.into_iter()
                .filter(|i| {
                    !matches!(
                        i.status(),
                        pb::InstallationStatus::Disabling | pb::InstallationStatus::Disabled
                    )
                })
                .collect(),
        )
    }

    async fn publish(&mut self, name: &str, behaviour: Behaviour) {
        // The plugin is always good: a crashing one would leave its node
        // without a scheduler, by design.
        let behaviour = if name == swap::PLUGIN {
            Behaviour::Good
        } else {
            behaviour
        };
        self.next_version += 1;
        let version = format!("1.{}.0", self.next_version);
        let addon = addon(name, &version, behaviour, &self.cluster.image);
        let invoke = self.history.now();
        let request_id = self.request_id();
        let mut result = Err(tonic::Status::unavailable("not tried"));
        for _ in 0..ATTEMPTS {
            result = self
                .marketplace()
                .publish_addon(mpb::PublishAddonRequest {
                    addon: Some(addon.clone()),
                    request_id: request_id.clone(),
                })
                .await;
            if Outcome::of(&result) != Outcome::Indeterminate {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let outcome = Outcome::of(&result);
        if let Ok(response) = result {
            let published = response.into_inner().addon.unwrap_or_default();
            self.published.push(Published {
                name: name.to_owned(),
                version: version.clone(),
                privileges: crate::grant_all(&published, false),
                id: published.id,
                behaviour,
            });
        }
        self.history.operation(
            "publish",
            invoke,
            &outcome,
            &format!("{name} {version} {behaviour:?}"),
        );
    }

    async fn install(&mut self) {
        if self.published.is_empty() {
            return;
        }
        let chosen = self.rng.pick(&self.published).clone();
        let selector: BTreeMap<String, String> = match self.rng.below(3) {
            0 => BTreeMap::new(),
            1 => BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
            _ => BTreeMap::from([("zone".to_owned(), "b".to_owned())]),
        };
        let request_id = self.request_id();
        let invoke = self.history.now();
        let mut named = Vec::new();
        let mut outcome = Outcome::Indeterminate;
        for _ in 0..ATTEMPTS {
            let result = self.install_request(&chosen, &selector, &request_id).await;
            outcome = Outcome::of(&result);
            if let Ok(response) = result {
                named.push(response.into_inner().installation.unwrap_or_default().id);
            }
            if outcome != Outcome::Indeterminate {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if outcome == Outcome::Indeterminate {
            self.ledger.unanswered_installs += 1;
        }
        // One answered install in three is sent again, as by a client
        // that lost the answer: it must answer with what it made.
        let mut again = None;
        if outcome == Outcome::Ok && self.rng.below(3) == 0 {
            for _ in 0..ATTEMPTS {
                let result = self.install_request(&chosen, &selector, &request_id).await;
                let retried = Outcome::of(&result);
                if let Ok(response) = result {
                    named.push(response.into_inner().installation.unwrap_or_default().id);
                }
                if let Outcome::Refused(code, message) = &retried {
                    self.ledger
                        .refused_retries
                        .push(format!("request {request_id} sent again: {code} {message}"));
                }
                if retried != Outcome::Indeterminate {
                    again = Some(retried);
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        self.ledger.installs.insert(request_id, named.clone());
        self.history.operation(
            "install",
            invoke,
            &outcome,
            &format!(
                "{} {} ({:?}) on {selector:?}: {named:?}{}",
                chosen.name,
                chosen.version,
                chosen.behaviour,
                again.map_or(String::new(), |again| format!(", sent again: {again:?}"))
            ),
        );
    }

    /// One attempt of an install request.
    async fn install_request(
        &self,
        chosen: &Published,
        selector: &BTreeMap<String, String>,
        request_id: &str,
    ) -> Result<tonic::Response<pb::InstallAddonResponse>, tonic::Status> {
        self.manager()
            .install_addon(pb::InstallAddonRequest {
                marketplace_id: chosen.id.clone(),
                request_id: request_id.to_owned(),
                accepted_privileges: chosen.privileges.clone(),
                node_selector: selector.clone(),
                ..Default::default()
            })
            .await
    }

    async fn upgrade(&mut self, live: &[pb::Installation]) {
        let upgradable: Vec<&pb::Installation> = live
            .iter()
            .filter(|i| {
                i.addon
                    .as_ref()
                    .is_some_and(|a| UPGRADABLE.contains(&a.name.as_str()))
            })
            .collect();
        if upgradable.is_empty() {
            return;
        }
        let installation = (*self.rng.pick(&upgradable)).clone();
        let name = installation
            .addon
            .as_ref()
            .map(|a| a.name.clone())
            .unwrap_or_default();
        let versions: Vec<Published> = self
            .published
            .iter()
            .filter(|p| p.name == name)
            .cloned()
            .collect();
        if versions.is_empty() {
            return;
        }
        let target = self.rng.pick(&versions).clone();
        let request = pb::UpgradeInstallationRequest {
            id: installation.id.clone(),
            version: target.version.clone(),
            accepted_privileges: target.privileges.clone(),
            request_id: self.request_id(),
            min_healthy_time: seconds(MIN_HEALTHY_S),
            progress_deadline: seconds(PROGRESS_DEADLINE_S),
            ..Default::default()
        };
        let detail = format!(
            "{} to {} ({:?})",
            installation.id, target.version, target.behaviour
        );
        self.recorded("upgrade", &detail, |mut client| {
            let request = request.clone();
            async move { client.upgrade_installation(request).await.map(|_| ()) }
        })
        .await;
    }

    async fn rollback(&mut self, live: &[pb::Installation]) {
        let upgraded: Vec<&pb::Installation> = live.iter().filter(|i| i.release > 1).collect();
        if upgraded.is_empty() {
            return;
        }
        let installation = (*self.rng.pick(&upgraded)).clone();
        let release = 1 + self
            .rng
            .below(usize::try_from(installation.release - 1).unwrap_or(1))
            as u64;
        let request = pb::RollbackInstallationRequest {
            id: installation.id.clone(),
            release,
            request_id: self.request_id(),
            min_healthy_time: seconds(MIN_HEALTHY_S),
            progress_deadline: seconds(PROGRESS_DEADLINE_S),
            ..Default::default()
        };
        let detail = format!("{} to release {release}", installation.id);
        self.recorded("rollback", &detail, |mut client| {
            let request = request.clone();
            async move { client.rollback_installation(request).await.map(|_| ()) }
        })
        .await;
    }

    async fn uninstall(&mut self, live: &[pb::Installation]) {
        if live.is_empty() {
            return;
        }
        let installation = self.rng.pick(live).clone();
        let purge = self.rng.chance(0.5);
        let request = pb::UninstallAddonRequest {
            id: installation.id.clone(),
            purge,
            request_id: self.request_id(),
            ..Default::default()
        };
        let detail = format!("{} purge {purge}", installation.id);
        self.recorded("uninstall", &detail, |mut client| {
            let request = request.clone();
            async move { client.uninstall_addon(request).await.map(|_| ()) }
        })
        .await;
    }

    /// A node's zone changes: its monitor restarts with the other label.
    async fn relabel(&mut self) {
        let n = self.rng.below(self.cluster.nodes.len());
        // A node under a fault keeps its labels this time.
        let Ok(mut node) = self.cluster.nodes[n].try_lock() else {
            return;
        };
        let invoke = self.history.now();
        let zone = match node.labels.get("zone").map(String::as_str) {
            Some("a") => "b",
            _ => "a",
        };
        node.labels.insert("zone".into(), zone.into());
        node.host.stop_monitor().await;
        self.cluster.start_monitor(&mut node).await;
        self.history.disturbed(&node.host.node_id, invoke);
        self.history.operation(
            "relabel",
            invoke,
            &Outcome::Ok,
            &format!("{} to zone {zone}", node.host.node_id),
        );
    }

    /// A read, as dashboards make them all the time.
    async fn read(&mut self) {
        let invoke = self.history.now();
        let result = list_installations(&mut self.manager()).await;
        self.history
            .operation("list", invoke, &Outcome::of(&result), "");
    }

    /// Makes the call `call` makes ([`Self::retried`]) and records it as
    /// an operation of `kind` about `detail`.
    async fn recorded<F, Fut>(&self, kind: &str, detail: &str, call: F)
    where
        F: Fn(AddonsManagerServiceClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>>,
    {
        let invoke = self.history.now();
        let outcome = self.retried(call).await;
        self.history.operation(kind, invoke, &outcome, detail);
    }

    /// Calls `call` until it is answered, at most [`ATTEMPTS`] times.
    async fn retried<F, Fut>(&self, call: F) -> Outcome
    where
        F: Fn(AddonsManagerServiceClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>>,
    {
        let mut outcome = Outcome::Indeterminate;
        for _ in 0..ATTEMPTS {
            outcome = Outcome::of(&call(self.manager()).await);
            if outcome != Outcome::Indeterminate {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        outcome
    }
}

/// `n` seconds, as protobuf has them.
fn seconds(n: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: n,
        nanos: 0,
    })
}

/// How long a node must keep a release healthy in the campaign's
/// rollouts, and how long it may take.
const MIN_HEALTHY_S: i64 = 2;
const PROGRESS_DEADLINE_S: i64 = 30;

/// Every installation, page by page.
pub async fn list_installations(
    client: &mut AddonsManagerServiceClient<tonic::transport::Channel>,
) -> Result<Vec<pb::Installation>, tonic::Status> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_installations(pb::ListInstallationsRequest {
                page_size: 100,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        all.extend(page.installations);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

/// The descriptor of `name` `version` behaving as `behaviour`.
fn addon(name: &str, version: &str, behaviour: Behaviour, image: &str) -> mpb::Addon {
    let sh = |script: &str| vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
    // A loop that ends at once on SIGTERM (a shell as PID 1 ignores it
    // otherwise, and every stop would wait out the grace period).
    let run = "trap 'exit 0' TERM; while :; do /bin/busybox sleep 1; done";
    let (command, health_check) = match behaviour {
        Behaviour::Good if name == swap::PLUGIN => {
            (crate::images::http_server_command(swap::PLUGIN_BODY), None)
        }
        Behaviour::Good => (sh(run), None),
        Behaviour::Crashes => (sh("echo broken; exit 3"), None),
        Behaviour::CrashesLater => (sh("/bin/busybox sleep 2; echo broken; exit 3"), None),
        Behaviour::Unhealthy => (
            sh(run),
            Some(mpb::HealthCheck {
                probe: Some(mpb::health_check::Probe::Exec(mpb::ExecProbe {
                    command: vec!["/bin/busybox".into(), "false".into()],
                })),
                interval: seconds(1),
                timeout: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
                retries: 2,
                ..Default::default()
            }),
        ),
        Behaviour::FillsLogs => (
            sh(
                "trap 'exit 0' TERM; while :; do for i in 1 2 3 4 5 6 7 8; do echo chaos chaos chaos chaos chaos chaos chaos chaos; done; /bin/busybox sleep 0.05; done",
            ),
            None,
        ),
        Behaviour::Exits => (sh("/bin/busybox sleep 3; exit 0"), None),
    };
    mpb::Addon {
        name: name.into(),
        version: version.into(),
        services: vec![mpb::ServiceSpec {
            service_name: if name == swap::PLUGIN {
                swap::CORE.into()
            } else {
                name.into()
            },
            image: image.into(),
            command,
            health_check,
            ..Default::default()
        }],
        ..Default::default()
    }
}
