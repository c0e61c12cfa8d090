//! The command's own span: when the OpenTelemetry variables ask for trace
//! export (as for the servers, see `addons-otlp`), each command is one span
//! of service `oak-addons`, and every call it makes carries its
//! `traceparent`, so what the servers do for it joins the command's trace:
//! one trace from `oak-addons install` to the container's start on a node.

use std::collections::HashMap;

use opentelemetry::{
    Context,
    propagation::TextMapPropagator as _,
    trace::{SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _},
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};

/// The span of one command, exported when it ends.
pub(crate) struct CommandTrace {
    provider: SdkTracerProvider,
    cx: Context,
}

impl CommandTrace {
    /// The span of `command` (`oak-addons install`, say), when the
    /// environment asks for export; none otherwise. An exporter that
    /// cannot be set up is a warning: the command runs untraced.
    pub(crate) fn start(command: &str) -> Option<Self> {
        let tracing = addons_otlp::tracer_provider("oak-addons");
        if let Some(err) = &tracing.export_error {
            eprintln!("warning: traces are not exported: {err}");
        }
        if !tracing.exporting {
            return None;
        }
        let tracer = tracing.provider.tracer("oak-addons");
        let span = tracer
            .span_builder(command.to_owned())
            .with_kind(SpanKind::Client)
            .start(&tracer);
        Some(Self {
            provider: tracing.provider,
            cx: Context::current_with_span(span),
        })
    }

    /// The W3C `traceparent` the command's calls carry.
    pub(crate) fn traceparent(&self) -> String {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&self.cx, &mut carrier);
        carrier.remove("traceparent").unwrap_or_default()
    }

    /// Ends the span, an error when the command failed, and waits for its
    /// export (off the runtime's thread: the exporter's connection runs on
    /// this runtime).
    pub(crate) async fn end(self, failure: Option<String>) {
        let span = self.cx.span();
        if let Some(message) = failure {
            span.set_status(Status::error(message));
        }
        span.end();
        let provider = self.provider;
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(err)) = flushed {
            eprintln!("warning: exporting the command's trace failed: {err}");
        }
    }
}

/// The command as its span names it: `oak-addons` and its subcommands
/// (`oak-addons marketplace publish`), never its arguments.
pub(crate) fn command_name() -> String {
    use clap::CommandFactory as _;
    let mut name = "oak-addons".to_owned();
    if let Ok(matches) = super::Cli::command().try_get_matches_from(std::env::args_os()) {
        let mut current = &matches;
        while let Some((sub, next)) = current.subcommand() {
            name.push(' ');
            name.push_str(sub);
            current = next;
        }
    }
    name
}
