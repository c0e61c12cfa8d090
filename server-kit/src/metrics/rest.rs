//! The metrics of every REST request a server answers, as OpenTelemetry's
//! HTTP semantic conventions name them in Prometheus
//! (`http_server_request_duration_seconds` by method, route template and
//! status code; `http_server_active_requests`). Routes are the server's
//! own templates (`/api/v1/addons/:id`): a stranger's paths are `other`,
//! and a method outside the standard ones `_OTHER`.

use std::time::Instant;

use http::Method;

use super::{
    Metrics,
    kinds::{EncodeLabelSet, Family, Gauge, Latencies, latencies},
};

/// A REST request's method and route, as a label set.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    http_request_method: &'static str,
    http_route: String,
}

/// A REST request's method, route and status code, as a label set.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnsweredLabels {
    http_request_method: &'static str,
    http_route: String,
    http_response_status_code: u16,
}

/// The metrics of every REST request a server answers.
#[derive(Debug, Clone)]
pub(crate) struct RestMetrics {
    duration: Latencies<AnsweredLabels>,
    active: Family<RouteLabels, Gauge>,
}

/// The route label of a path no route matches.
pub(crate) const OTHER_ROUTE: &str = "other";

impl RestMetrics {
    /// The metrics, registered in `metrics`.
    pub(crate) fn new(metrics: &Metrics) -> Self {
        Self {
            duration: metrics.add(
                "http_server_request_duration_seconds",
                "Time to answer a REST request (Oakestra's routes), by method, route template and status code",
                latencies(),
            ),
            active: metrics.add(
                "http_server_active_requests",
                "REST requests being answered",
                Family::default(),
            ),
        }
    }

    /// A request with `method` to `route` (a template, or [`OTHER_ROUTE`])
    /// starts.
    pub(crate) fn start(&self, method: &Method, route: String) -> RestRequestMetrics {
        let labels = RouteLabels {
            http_request_method: method_name(method),
            http_route: route,
        };
        self.active.get_or_create(&labels).inc();
        RestRequestMetrics {
            metrics: self.clone(),
            labels,
            start: Instant::now(),
        }
    }
}

/// A method as a label: the standard ones, `_OTHER` for the rest (as the
/// semantic conventions say), so a stranger's methods add no label.
fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "_OTHER",
    }
}

/// One REST request under way: active until dropped; counted when
/// [`RestRequestMetrics::end`] says how it was answered (a client that
/// went away before is not).
#[derive(Debug)]
pub(crate) struct RestRequestMetrics {
    metrics: RestMetrics,
    labels: RouteLabels,
    start: Instant,
}

impl RestRequestMetrics {
    /// The request was answered with `status`.
    pub(crate) fn end(self, status: http::StatusCode) {
        self.metrics
            .duration
            .get_or_create(&AnsweredLabels {
                http_request_method: self.labels.http_request_method,
                http_route: self.labels.http_route.clone(),
                http_response_status_code: status.as_u16(),
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for RestRequestMetrics {
    fn drop(&mut self) {
        self.metrics.active.get_or_create(&self.labels).dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_answer_is_counted_by_route_template_and_code() {
        let metrics = Metrics::new();
        let rest = RestMetrics::new(&metrics);
        rest.start(&Method::GET, "/api/v1/addons/:id".into())
            .end(http::StatusCode::NOT_FOUND);
        let abandoned = rest.start(&Method::from_bytes(b"BREW").unwrap(), OTHER_ROUTE.into());
        let text = metrics.encode();
        for line in [
            r#"http_server_request_duration_seconds_count{http_request_method="GET",http_route="/api/v1/addons/:id",http_response_status_code="404"} 1"#,
            r#"http_server_active_requests{http_request_method="GET",http_route="/api/v1/addons/:id"} 0"#,
            r#"http_server_active_requests{http_request_method="_OTHER",http_route="other"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        drop(abandoned);
        assert!(metrics.encode().contains(
            r#"http_server_active_requests{http_request_method="_OTHER",http_route="other"} 0"#
        ));
    }
}
