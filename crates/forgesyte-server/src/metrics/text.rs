//! The Prometheus text format (version 0.0.4) of the metrics, for a
//! scraper that asks for it (`Accept: text/plain`) rather than for
//! OpenMetrics: `promtool check metrics`, agents that read only the older
//! format.
//!
//! `prometheus-client` encodes OpenMetrics only; the two formats differ in
//! a few lines, rewritten here from its output rather than encoded twice:
//! no `# EOF` and no `# UNIT`; a counter family is named by its `_total`
//! sample, an info family by its `_info` sample (as a gauge); `unknown` is
//! `untyped`; `_created` samples and exemplars are left out; a help text
//! does not escape `"`.

use std::collections::HashMap;

use axum::http::HeaderMap;

use crate::accept::{Accept, preferred, refused};

/// The content type of the Prometheus text format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request's `Accept` headers ask for the Prometheus text format
/// rather than OpenMetrics: `text/plain` (or `text/*`) weighs more than
/// OpenMetrics (`application/openmetrics-text`, `application/*`, `*/*`), or
/// as much and is given first, or OpenMetrics is refused (`q=0`, and then
/// `*/*` may select the text format). No header, `*/*`, or nothing either
/// format matches gets OpenMetrics; Prometheus itself asks for OpenMetrics
/// first.
pub(crate) fn wanted(headers: &HeaderMap) -> bool {
    let accept = Accept::of(headers);
    let openmetrics = accept.weight(&["application/openmetrics-text", "application/*", "*/*"]);
    let text = if refused(openmetrics) {
        accept.weight(&["text/plain", "text/*", "*/*"])
    } else {
        accept.weight(&["text/plain", "text/*"])
    };
    preferred([(false, openmetrics), (true, text)]).unwrap_or(false)
}

/// `openmetrics` (an OpenMetrics text exposition) in the Prometheus text
/// format.
pub(crate) fn from_openmetrics(openmetrics: &str) -> String {
    let kinds: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    let renamed = |family: &str| -> String {
        match kinds.get(family).copied() {
            Some("counter") if !family.ends_with("_total") => format!("{family}_total"),
            Some("info") => format!("{family}_info"),
            _ => family.to_owned(),
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some((family, help)) = line.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')) {
            out.push_str(&format!(
                "# HELP {} {}\n",
                renamed(family),
                help.replace("\\\"", "\"")
            ));
            continue;
        }
        if let Some((family, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            let kind = match kind {
                "info" | "stateset" => "gauge",
                "unknown" => "untyped",
                "gaugehistogram" => "histogram",
                other => other,
            };
            out.push_str(&format!("# TYPE {} {kind}\n", renamed(family)));
            continue;
        }
        if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        if name
            .strip_suffix("_created")
            .is_some_and(|family| kinds.get(family) == Some(&"counter"))
        {
            continue;
        }
        out.push_str(without_exemplar(line));
        out.push('\n');
    }
    out
}

/// A sample line without its exemplar (` # {…} value` after the value: not
/// in this format). Looked for only after the label set, whose values a
/// plugin names (a tool called `a # {b`).
fn without_exemplar(line: &str) -> &str {
    let mut after_labels = line.find([' ', '{']).unwrap_or(line.len());
    if line[after_labels..].starts_with('{') {
        let mut quoted = false;
        let mut escaped = false;
        for (at, c) in line[after_labels..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    after_labels += at + 1;
                    break;
                }
                _ => {}
            }
        }
    }
    match line[after_labels..].find(" # ") {
        Some(at) => &line[..after_labels + at],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_the_prometheus_text_format() {
        let openmetrics = "\
# HELP forgesyte_tool_calls Tool calls by \\\"outcome\\\".
# TYPE forgesyte_tool_calls counter
forgesyte_tool_calls_total{plugin=\"a\",outcome=\"ok\"} 3
forgesyte_tool_calls_created{plugin=\"a\",outcome=\"ok\"} 1700000000.0
# HELP forgesyte_build The server's version.
# TYPE forgesyte_build info
forgesyte_build_info{version=\"0.1.0\"} 1
# HELP forgesyte_call_seconds Call latency.
# TYPE forgesyte_call_seconds histogram
# UNIT forgesyte_call_seconds seconds
forgesyte_call_seconds_bucket{le=\"0.1\"} 2 # {trace_id=\"x\"} 0.05
forgesyte_call_seconds_sum 0.1
forgesyte_call_seconds_count 2
# HELP odd Something.
# TYPE odd unknown
odd 1
# EOF
";
        assert_eq!(
            from_openmetrics(openmetrics),
            "\
# HELP forgesyte_tool_calls_total Tool calls by \"outcome\".
# TYPE forgesyte_tool_calls_total counter
forgesyte_tool_calls_total{plugin=\"a\",outcome=\"ok\"} 3
# HELP forgesyte_build_info The server's version.
# TYPE forgesyte_build_info gauge
forgesyte_build_info{version=\"0.1.0\"} 1
# HELP forgesyte_call_seconds Call latency.
# TYPE forgesyte_call_seconds histogram
forgesyte_call_seconds_bucket{le=\"0.1\"} 2
forgesyte_call_seconds_sum 0.1
forgesyte_call_seconds_count 2
# HELP odd Something.
# TYPE odd untyped
odd 1
"
        );
    }

    #[test]
    fn a_label_value_is_never_taken_for_an_exemplar() {
        for line in [
            r#"forgesyte_tool_calls_total{plugin="p",tool="a # {b"} 1"#,
            r#"forgesyte_tool_calls_total{plugin="p",tool="q\" # {}"} 2"#,
            "plain_metric 3",
        ] {
            assert_eq!(without_exemplar(line), line);
        }
        assert_eq!(
            without_exemplar(r#"x_bucket{le="0.1",tool="a # {b"} 2 # {trace_id="t"} 0.05"#),
            r#"x_bucket{le="0.1",tool="a # {b"} 2"#
        );
        assert_eq!(without_exemplar("y 1 # {a=\"b\"} 1"), "y 1");
    }

    #[test]
    fn text_is_for_a_request_that_prefers_it_or_refuses_openmetrics() {
        let wants = |values: &[&str]| wanted(&crate::accept::accept_headers(values));
        assert!(!wants(&[]));
        assert!(!wants(&["*/*"]));
        assert!(wants(&["text/plain"]));
        assert!(wants(&["text/plain;version=0.0.4"]));
        assert!(wants(&["text/*"]));
        // Prometheus's own header: OpenMetrics first and heavier.
        assert!(!wants(&[
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        ]));
        assert!(!wants(&["application/json"]));
        // Refusals: `q=0` excludes a format whatever a wildcard says.
        assert!(wants(&[
            "application/openmetrics-text;q=0, text/plain;q=0.1"
        ]));
        assert!(wants(&["application/openmetrics-text;q=0, */*"]));
        assert!(!wants(&["text/plain;q=0, */*"]));
        assert!(!wants(&["text/plain;q=0"]));
        // Weights, then order; over several headers.
        assert!(wants(&[
            "application/openmetrics-text;q=0.2",
            "text/plain;q=0.9"
        ]));
        assert!(!wants(&[
            "text/plain;q=0.2, application/openmetrics-text;q=0.9"
        ]));
        assert!(wants(&["text/plain, application/openmetrics-text"]));
        assert!(!wants(&["application/openmetrics-text, text/plain"]));
    }
}
