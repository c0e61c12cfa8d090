//! A monitor stand-in that speaks the link protocol to a real manager:
//! hello, numbered status reports kept until acked and re-sent after a
//! reconnect, and the desired state as the manager sends it.

use std::collections::BTreeMap;

use oakestra_addons_proto::engine::v1::{
    self as pb, monitor_link_service_client::MonitorLinkServiceClient, monitor_link_service_server,
    open_link_request, open_link_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, transport::Channel};

/// One simulated node's monitor.
#[derive(Debug)]
pub struct TestMonitor {
    node: String,
    plane: pb::Plane,
    tx: mpsc::Sender<pb::OpenLinkRequest>,
    inbound: Streaming<pb::OpenLinkResponse>,
    next_sequence: u64,
    unacked: BTreeMap<u64, pb::StatusReport>,
    /// The newest desired state received.
    pub desired: Option<pb::DesiredState>,
    /// The highest sequence number acked.
    pub acked: u64,
    /// Takes the desired state in chunks.
    chunked: bool,
    /// The desired state being put together from chunks.
    staging: BTreeMap<String, pb::DesiredInstallation>,
    /// Encoded size of the largest message received.
    pub largest_message: usize,
    /// Desired-state chunks received.
    pub chunks: usize,
}

/// The hello of `node` of `plane` (taking chunks when `chunked`).
pub fn hello_with(node: &str, plane: pb::Plane, chunked: bool) -> pb::OpenLinkRequest {
    pb::OpenLinkRequest {
        message: Some(open_link_request::Message::Hello(pb::Hello {
            node_id: node.to_owned(),
            plane: plane.into(),
            monitor_version: "test".into(),
            observed: Vec::new(),
            applied_generation: 0,
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            accepts_desired_state_chunks: chunked,
            labels: Default::default(),
        })),
    }
}

/// Opens a link whose first message is `first`, with a bearer token if
/// given; for protocol and security tests.
pub async fn open_raw_with(
    channel: Channel,
    first: pb::OpenLinkRequest,
    token: Option<&str>,
) -> Result<
    (
        mpsc::Sender<pb::OpenLinkRequest>,
        Streaming<pb::OpenLinkResponse>,
    ),
    Status,
> {
    let (tx, rx) = mpsc::channel(64);
    tx.send(first).await.expect("queue the first message");
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .expect("a token is header text"),
        );
    }
    let inbound = MonitorLinkServiceClient::new(channel)
        .open_link(request)
        .await?
        .into_inner();
    Ok((tx, inbound))
}

/// Opens a link whose first message is `first`; for protocol tests.
pub async fn open_raw(
    channel: Channel,
    first: pb::OpenLinkRequest,
) -> Result<
    (
        mpsc::Sender<pb::OpenLinkRequest>,
        Streaming<pb::OpenLinkResponse>,
    ),
    Status,
> {
    open_raw_with(channel, first, None).await
}

impl TestMonitor {
    /// Connects as `node` of `plane`, taking the desired state whole.
    pub async fn connect(channel: Channel, node: &str, plane: pb::Plane) -> Result<Self, Status> {
        Self::connect_with(channel, node, plane, false).await
    }

    /// Connects as `node` of `plane`, taking the desired state in chunks
    /// when `chunked`.
    pub async fn connect_with(
        channel: Channel,
        node: &str,
        plane: pb::Plane,
        chunked: bool,
    ) -> Result<Self, Status> {
        let (tx, inbound) = open_raw(channel, hello_with(node, plane, chunked)).await?;
        let mut monitor = Self {
            node: node.to_owned(),
            plane,
            tx,
            inbound,
            next_sequence: 1,
            unacked: BTreeMap::new(),
            desired: None,
            acked: 0,
            chunked,
            staging: BTreeMap::new(),
            largest_message: 0,
            chunks: 0,
        };
        monitor.handshake().await?;
        Ok(monitor)
    }

    /// Reads the desired state and the ack that open every link.
    async fn handshake(&mut self) -> Result<(), Status> {
        let mut acked = false;
        while !acked || self.desired.is_none() {
            match self.next().await? {
                Some(pb::OpenLinkResponse {
                    message: Some(open_link_response::Message::Ack(_)),
                }) => acked = true,
                Some(_) => {}
                None => return Err(Status::unavailable("link closed during the handshake")),
            }
        }
        Ok(())
    }

    /// Connects again (to a restarted manager, say) and re-sends every
    /// report not acked yet, in order.
    pub async fn reconnect(&mut self, channel: Channel) -> Result<(), Status> {
        let (tx, inbound) =
            open_raw(channel, hello_with(&self.node, self.plane, self.chunked)).await?;
        self.tx = tx;
        self.inbound = inbound;
        self.handshake().await?;
        for report in self.unacked.values() {
            self.send(open_link_request::Message::Report(report.clone()))
                .await;
        }
        Ok(())
    }

    /// Ends the link from this side.
    pub fn hang_up(self) {}

    async fn send(&self, message: open_link_request::Message) {
        // A closed link shows up as the end of `inbound`.
        let _ = self
            .tx
            .send(pb::OpenLinkRequest {
                message: Some(message),
            })
            .await;
    }

    /// Sends a raw message, for protocol tests.
    pub async fn send_raw(&self, message: pb::OpenLinkRequest) {
        let _ = self.tx.send(message).await;
    }

    /// Reports the installation's services on this node; returns the
    /// report's sequence number.
    pub async fn report(&mut self, installation_id: &str, services: Vec<pb::ServiceStatus>) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let report = pb::StatusReport {
            sequence,
            installation_id: installation_id.to_owned(),
            services,
            observe_time: None,
            verdict: None,
            ..Default::default()
        };
        self.unacked.insert(sequence, report.clone());
        self.send(open_link_request::Message::Report(report)).await;
        sequence
    }

    /// Sends a report with a chosen sequence number (a stale re-send, say).
    pub async fn report_as(
        &mut self,
        sequence: u64,
        installation_id: &str,
        services: Vec<pb::ServiceStatus>,
    ) {
        let report = pb::StatusReport {
            sequence,
            installation_id: installation_id.to_owned(),
            services,
            observe_time: None,
            verdict: None,
            ..Default::default()
        };
        self.send(open_link_request::Message::Report(report)).await;
    }

    /// Sends a heartbeat.
    pub async fn heartbeat(&self) {
        self.send(open_link_request::Message::Heartbeat(pb::Heartbeat {
            send_time: None,
        }))
        .await;
    }

    /// Reports sent and not acked yet.
    pub fn unacked(&self) -> Vec<u64> {
        self.unacked.keys().copied().collect()
    }

    /// The next message from the manager, recorded; `Err` when the link
    /// ended with a status, `Ok(None)` when it ended cleanly.
    pub async fn next(&mut self) -> Result<Option<pb::OpenLinkResponse>, Status> {
        let message = self.inbound.message().await?;
        if let Some(message) = &message {
            self.largest_message = self
                .largest_message
                .max(prost::Message::encoded_len(message));
            match &message.message {
                Some(open_link_response::Message::DesiredState(state)) => {
                    self.desired = Some(state.clone())
                }
                Some(open_link_response::Message::DesiredStateChunk(chunk)) => {
                    self.chunks += 1;
                    if chunk.reset {
                        self.staging.clear();
                    }
                    for id in &chunk.removed_installation_ids {
                        self.staging.remove(id);
                    }
                    for upsert in &chunk.upserts {
                        self.staging
                            .insert(upsert.installation_id.clone(), upsert.clone());
                    }
                    if chunk.complete {
                        self.desired = Some(pb::DesiredState {
                            generation: chunk.generation,
                            installations: self.staging.values().cloned().collect(),
                        });
                    }
                }
                Some(open_link_response::Message::Ack(ack)) => {
                    self.acked = self.acked.max(ack.sequence);
                    // Numbering continues above what the manager stored.
                    self.next_sequence = self.next_sequence.max(ack.sequence + 1);
                    self.unacked.retain(|sequence, _| *sequence > ack.sequence);
                }
                None => {}
            }
        }
        Ok(message)
    }

    /// Reads messages until `sequence` is acked.
    pub async fn wait_acked(&mut self, sequence: u64) {
        while self.acked < sequence {
            self.next()
                .await
                .expect("link alive")
                .expect("link open while waiting for an ack");
        }
    }

    /// Reads messages until the desired state satisfies `check`.
    pub async fn wait_desired(
        &mut self,
        check: impl Fn(&pb::DesiredState) -> bool,
    ) -> pb::DesiredState {
        loop {
            if let Some(state) = &self.desired
                && check(state)
            {
                return state.clone();
            }
            self.next()
                .await
                .expect("link alive")
                .expect("link open while waiting for the desired state");
        }
    }
}

/// A service status as a monitor reports it.
pub fn service(name: &str, phase: pb::ServicePhase) -> pb::ServiceStatus {
    pb::ServiceStatus {
        service_name: name.to_owned(),
        phase: phase.into(),
        container_id: format!("root_{name}"),
        ..Default::default()
    }
}

/// A manager stand-in for node tests: it sends one desired state (and an
/// ack of nothing) on every link, then acks each report and passes it on,
/// whatever the state says, as a hostile or compromised manager would.
struct FakeManager {
    desired: pb::DesiredState,
    reports: mpsc::UnboundedSender<pb::StatusReport>,
}

type Outbound =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::OpenLinkResponse, Status>> + Send>>;

#[tonic::async_trait]
impl monitor_link_service_server::MonitorLinkService for FakeManager {
    type OpenLinkStream = Outbound;

    async fn open_link(
        &self,
        request: tonic::Request<Streaming<pb::OpenLinkRequest>>,
    ) -> Result<tonic::Response<Outbound>, Status> {
        use tokio_stream::StreamExt as _;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let desired = self.desired.clone();
        let reports = self.reports.clone();
        tokio::spawn(async move {
            let send = |message| pb::OpenLinkResponse {
                message: Some(message),
            };
            let _ = tx
                .send(Ok(send(open_link_response::Message::DesiredState(desired))))
                .await;
            let _ = tx
                .send(Ok(send(open_link_response::Message::Ack(pb::Ack {
                    sequence: 0,
                }))))
                .await;
            while let Some(Ok(message)) = inbound.next().await {
                if let Some(open_link_request::Message::Report(report)) = message.message {
                    let sequence = report.sequence;
                    let _ = reports.send(report);
                    let _ = tx
                        .send(Ok(send(open_link_response::Message::Ack(pb::Ack {
                            sequence,
                        }))))
                        .await;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves `desired` to monitors on a loopback port, as [`FakeManager`];
/// returns its URL and the reports it receives.
pub async fn fake_manager(
    desired: pb::DesiredState,
) -> (String, mpsc::UnboundedReceiver<pb::StatusReport>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let url = format!(
        "http://{}",
        listener.local_addr().expect("read the bound address")
    );
    let (reports_tx, reports) = mpsc::unbounded_channel();
    let service = monitor_link_service_server::MonitorLinkServiceServer::new(FakeManager {
        desired,
        reports: reports_tx,
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (url, reports)
}
