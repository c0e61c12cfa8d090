//! One link's session: the hello, then the desired state (whole, or in
//! chunks and changes), the ack of what is stored, and the loop of reports,
//! heartbeats and desired-state changes.

use std::{sync::Arc, time::Duration};

use oakestra_addons_proto::engine::v1::{self as pb, open_link_request, open_link_response};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::{LinkHub, desired::Desired, hello::ValidHello};
use crate::{Error, convert};

/// How far past the last stored sequence number a report may jump: far
/// more than a monitor's unacked reports, far less than what would lock the
/// node's real reports out.
const MAX_SEQUENCE_STEP: u64 = 1 << 20;

/// The monitor's end of the session.
type Outbound = mpsc::Sender<Result<pb::OpenLinkResponse, Status>>;

/// Reports of one link being written at once: the link reads on while
/// earlier reports are stored (so a burst goes into few group commits),
/// up to this many, and acks them in order.
const MAX_REPORTS_IN_FLIGHT: usize = 64;

/// A report handed to the writer, waiting to be acked: its sequence
/// number, the writer's answer, and when it came.
type InFlight = (
    u64,
    tokio::sync::oneshot::Receiver<Result<(), String>>,
    std::time::Instant,
);

impl LinkHub {
    /// Serves one link: checks the hello, then runs the link in a task and
    /// returns the stream of messages to the monitor.
    pub async fn connect(
        &self,
        identity: addons_server_kit::Identity,
        mut inbound: Streaming<pb::OpenLinkRequest>,
    ) -> Result<mpsc::Receiver<Result<pb::OpenLinkResponse, Status>>, Status> {
        let first = tokio::time::timeout(self.options.hello_timeout, inbound.message())
            .await
            .map_err(|_| Error::HelloTimeout(self.options.hello_timeout))??;
        let hello = match first.and_then(|m| m.message) {
            Some(open_link_request::Message::Hello(hello)) => hello,
            Some(_) => {
                return Err(
                    Error::invalid("hello", "the first message of a link must be a hello").into(),
                );
            }
            None => {
                return Err(Error::invalid(
                    "hello",
                    "the link closed or sent an empty message before its hello",
                )
                .into());
            }
        };
        let hello = ValidHello::try_from(hello)?;
        if let Some(allowed) = &self.options.node_labels {
            allowed.check(&hello.node, &hello.labels)?;
        }
        if hello.plane != self.plane {
            return Err(Error::PlaneMismatch {
                node: hello.node.clone(),
                manager: convert::plane_name(self.plane),
                monitor: convert::plane_name(hello.plane),
            }
            .into());
        }
        // A node's identity is its node id: a token's `sub` or a
        // certificate's CN. Only an admin may speak for any node.
        let authenticated = identity.source != addons_server_kit::auth::Source::Anonymous;
        if authenticated
            && identity.subject != hello.node
            && !identity.has(addons_server_kit::Role::Admin)
        {
            return Err(Error::NodeIdentityMismatch {
                subject: identity.subject,
                node: hello.node,
            }
            .into());
        }
        let subject = if authenticated {
            identity.subject.as_str()
        } else {
            ""
        };
        let (epoch, replaced) = self.presence.register(&hello.node, subject)?;
        // Released however this call ends: a monitor that goes away while
        // its node is recorded (the store slow, say) drops this future,
        // and its node must not stay linked for good.
        let registered = Registered {
            presence: self.presence.clone(),
            node: hello.node.clone(),
            epoch,
        };
        self.node_linked(&hello).await?;
        self.options.metrics.monitors_linked.inc();
        let heartbeat_timeout = self.options.heartbeat_timeout.max(hello.heartbeat * 3);
        tracing::info!(node = %hello.node, version = %hello.version, observed = hello.observed, chunks = hello.accepts_chunks, "monitor connected");
        let (tx, rx) = mpsc::channel(16);
        let hub = self.clone();
        tokio::spawn(async move {
            let node = hello.node.clone();
            match hub
                .run_link(&hello, epoch, inbound, &tx, heartbeat_timeout, &replaced)
                .await
            {
                Err(err) => {
                    let status = Status::from(err);
                    tracing::info!(%node, code = ?status.code(), reason = status.message(), "monitor link ended");
                    let _ = tx.send(Err(status)).await;
                }
                Ok(()) => tracing::info!(%node, "monitor link ended"),
            }
            hub.options.metrics.monitors_linked.dec();
            drop(registered);
            if !hub.presence.is_connected(&node) {
                // Boxed: its future is the largest state of this task,
                // which every linked node holds for as long as it is
                // linked; boxed, it takes memory only at the end.
                Box::pin(hub.node_unlinked(&node, chrono::Utc::now())).await;
                hub.mark_disconnected_later(node);
            }
        });
        Ok(rx)
    }

    async fn run_link(
        &self,
        hello: &ValidHello,
        epoch: u64,
        mut inbound: Streaming<pb::OpenLinkRequest>,
        tx: &Outbound,
        heartbeat_timeout: Duration,
        replaced: &tokio::sync::Notify,
    ) -> Result<(), Error> {
        let node = hello.node.as_str();
        let mut desired = self.desired.clone();
        let mut sent: Arc<Desired> = desired.borrow_and_update().clone();
        // Every installation this link has placed on the node: a report
        // about any other is not the node's to make.
        let mut placed: std::collections::HashSet<String> =
            sent.placed_ids(&hello.labels).cloned().collect();
        let labels = Arc::new(hello.labels.clone());
        if hello.accepts_chunks {
            for chunk in sent.full_chunks(&hello.labels) {
                send(
                    tx,
                    open_link_response::Message::DesiredStateChunk(chunk),
                    heartbeat_timeout,
                )
                .await?;
            }
        } else {
            send(
                tx,
                open_link_response::Message::DesiredState(sent.to_proto(&hello.labels)),
                heartbeat_timeout,
            )
            .await?;
        }
        // Tell the monitor where its numbering stands here (0: nothing
        // stored), so a restarted monitor continues above what is stored
        // instead of being ignored.
        let stored = self.presence.last_sequence(node);
        send(
            tx,
            open_link_response::Message::Ack(pb::Ack { sequence: stored }),
            heartbeat_timeout,
        )
        .await?;
        // Acks go out in report order, each once its report is durable;
        // reports stored by the same write are acked with one message.
        let (in_flight, mut to_ack) = mpsc::channel::<InFlight>(MAX_REPORTS_IN_FLIGHT);
        let acks = async {
            let mut waiting: Option<InFlight> = None;
            loop {
                let (mut sequence, done, came) = match waiting.take() {
                    Some(next) => next,
                    None => match to_ack.recv().await {
                        Some(next) => next,
                        None => return Ok(()),
                    },
                };
                self.check_stored(node, done.await, came)?;
                while let Ok((later, mut done, came)) = to_ack.try_recv() {
                    match done.try_recv() {
                        Ok(outcome) => {
                            self.check_stored(node, Ok(outcome), came)?;
                            sequence = later;
                        }
                        Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                            waiting = Some((later, done, came));
                            break;
                        }
                        Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                            return Err(Error::ReportDropped);
                        }
                    }
                }
                send(
                    tx,
                    open_link_response::Message::Ack(pb::Ack { sequence }),
                    heartbeat_timeout,
                )
                .await?;
            }
        };
        tokio::pin!(acks);
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.fired() => return Err(Error::ShuttingDown),
                () = replaced.notified() => return Err(Error::LinkReplaced(node.to_owned())),
                ended = &mut acks => return ended,
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Err(Error::ShuttingDown);
                    }
                    let current = desired.borrow_and_update().clone();
                    if hello.accepts_chunks {
                        for chunk in current.chunks_since(&sent, &hello.labels) {
                            let _spans = desired_spans(node, &chunk);
                            send(tx, open_link_response::Message::DesiredStateChunk(chunk), heartbeat_timeout).await?;
                        }
                    } else {
                        send(tx, open_link_response::Message::DesiredState(current.to_proto(&hello.labels)), heartbeat_timeout).await?;
                    }
                    placed.extend(current.placed_ids(&hello.labels).cloned());
                    sent = current;
                }
                received = tokio::time::timeout(heartbeat_timeout, inbound.message()) => {
                    let message = match received {
                        Err(_) => return Err(Error::HeartbeatTimeout {
                            node: node.to_owned(),
                            after: heartbeat_timeout,
                        }),
                        Ok(Err(status)) => {
                            tracing::debug!(%node, error = %status, "link stream failed");
                            return Err(Error::MonitorGone);
                        }
                        Ok(Ok(None)) => return Ok(()),
                        Ok(Ok(Some(message))) => message,
                    };
                    match message.message {
                        Some(open_link_request::Message::Heartbeat(_)) => {}
                        Some(open_link_request::Message::Report(report)) => {
                            let span = link_span(
                                "link report",
                                node,
                                &report.installation_id,
                                &report.traceparent,
                            );
                            let _in_span = span.enter();
                            let came = std::time::Instant::now();
                            self.options.metrics.reports_received.inc();
                            let sequence = report.sequence;
                            let last = self.presence.last_sequence(node);
                            if sequence > last.saturating_add(MAX_SEQUENCE_STEP) {
                                return Err(Error::invalid(
                                    "report.sequence",
                                    format!("{sequence} jumps more than {MAX_SEQUENCE_STEP} past the last stored {last}"),
                                ));
                            }
                            let was_placed = placed.contains(&report.installation_id);
                            let done = self.enqueue_report((node, epoch), report, was_placed, &labels)?;
                            // At the limit, wait for acks to go out first
                            // (they go out only while `acks` is polled).
                            tokio::select! {
                                sent = in_flight.send((sequence, done, came)) => {
                                    if sent.is_err() {
                                        return Err(Error::MonitorGone);
                                    }
                                }
                                ended = &mut acks => return ended,
                            }
                        }
                        Some(open_link_request::Message::Hello(_)) => {
                            return Err(Error::invalid("hello", "a link says hello once"));
                        }
                        None => return Err(Error::invalid("message", "empty message on the link")),
                    }
                }
            }
        }
    }
}

impl LinkHub {
    /// Whether a report the writer answered is stored (counted, with the
    /// time since it `came`).
    fn check_stored(
        &self,
        node: &str,
        answer: Result<Result<(), String>, tokio::sync::oneshot::error::RecvError>,
        came: std::time::Instant,
    ) -> Result<(), Error> {
        let metrics = &self.options.metrics;
        match answer {
            Ok(Ok(())) => {
                metrics.reports_acked.inc();
                metrics
                    .report_stored_seconds
                    .observe(came.elapsed().as_secs_f64());
                Ok(())
            }
            Ok(Err(message)) => {
                metrics.dropped("not_stored");
                tracing::warn!(%node, error = %message, "cannot persist status reports");
                Err(Error::ReportNotStored(message))
            }
            Err(_) => {
                metrics.dropped("not_stored");
                Err(Error::ReportDropped)
            }
        }
    }
}

/// The spans of sending `chunk` to `node`: one per installation it
/// changes whose change came with a trace, continuing that trace. They
/// end when dropped, after the send.
fn desired_spans(node: &str, chunk: &pb::DesiredStateChunk) -> Vec<tracing::Span> {
    chunk
        .upserts
        .iter()
        .filter(|upsert| !upsert.traceparent.is_empty())
        .map(|upsert| {
            link_span(
                "link send desired state",
                node,
                &upsert.installation_id,
                &upsert.traceparent,
            )
        })
        .collect()
}

/// A span of the link with `node` about `installation`, named `what`,
/// continuing the trace `traceparent` names.
fn link_span(
    what: &'static str,
    node: &str,
    installation: &str,
    traceparent: &str,
) -> tracing::Span {
    let span = tracing::info_span!(
        "link",
        otel.name = what,
        node,
        installation,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    addons_server_kit::continue_trace(&span, traceparent);
    span
}

/// A link's registration in the presence, released when dropped.
struct Registered {
    presence: Arc<super::presence::Presence>,
    node: String,
    epoch: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.presence.unregister(&self.node, self.epoch);
    }
}

/// Sends `message` on the link; a monitor that takes nothing for `within`
/// (its end half-open, behind a partition, say) ends the link: otherwise
/// the link would wait on it for as long as TCP does (many minutes), with
/// its node locked out (a second link of the node is refused).
async fn send(
    tx: &Outbound,
    message: open_link_response::Message,
    within: std::time::Duration,
) -> Result<(), Error> {
    let response = Ok(pb::OpenLinkResponse {
        message: Some(message),
    });
    match tokio::time::timeout(within, tx.send(response)).await {
        Ok(sent) => sent.map_err(|_| Error::MonitorGone),
        Err(_) => Err(Error::NotReading { after: within }),
    }
}
