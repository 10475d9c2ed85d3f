//! The server under test: where its routes are, whether it answers at all (before anything
//! is measured), and Specula's speculation counters from `/metrics`.

use awc::http::Uri;

use super::client::SpecCounts;
use super::BenchError;
use crate::actors::metrics::{SPEC_ACCEPTED_TOKENS, SPEC_DRAFTS, SPEC_DRAFT_TOKENS};

/// The routes of the server at `--url`.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// `http://HOST:PORT` and any path prefix, without a trailing `/` or `/v1`.
    base: String,
}

impl Endpoint {
    /// `http://HOST:PORT` (a missing scheme is taken as `http://`; a trailing `/v1` is
    /// dropped). HTTPS is refused: this client speaks plain HTTP.
    pub fn parse(url: &str) -> Result<Self, BenchError> {
        let bad = |reason: &str| BenchError::BadUrl { url: url.to_string(), reason: reason.to_string() };
        let full = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
        let uri: Uri = full.parse().map_err(|e: awc::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(bad("HTTPS is not supported; give the server's plain-HTTP address")),
            _ => return Err(bad("the scheme must be http://")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if uri.query().is_some() {
            return Err(bad("a base URL has no query"));
        }
        let path = uri.path().trim_end_matches('/');
        let path = path.strip_suffix("/v1").unwrap_or(path);
        Ok(Endpoint { base: format!("http://{authority}{path}") })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn completions(&self) -> String {
        format!("{}/v1/completions", self.base)
    }

    pub fn models(&self) -> String {
        format!("{}/v1/models", self.base)
    }

    pub fn metrics(&self) -> String {
        format!("{}/metrics", self.base)
    }

    pub fn websocket(&self) -> String {
        format!("ws{}/v1/ws", self.base.trim_start_matches("http"))
    }
}

/// Asks `/v1/models`: fails if nothing answers, or the server refuses (a wrong key);
/// gives the first model's id, `None` if the server has no such route.
pub async fn probe(client: &awc::Client, endpoint: &Endpoint) -> Result<Option<String>, BenchError> {
    let url = endpoint.models();
    let mut response = client
        .get(&url)
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| BenchError::Unreachable { url: url.clone(), reason: e.to_string() })?;
    let status = response.status();
    if status == awc::http::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let body = response.body().limit(1 << 20).await.unwrap_or_default();
    if !status.is_success() {
        let message = String::from_utf8_lossy(&body).chars().take(200).collect();
        return Err(BenchError::Http { url, status: status.as_u16(), message });
    }
    let models: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    Ok(models["data"][0]["id"].as_str().map(str::to_string))
}

/// Specula's speculation counters, summed over their labels; `None` if `/metrics` does not
/// answer or has none of them (another server, or an old Specula).
pub async fn spec_counters(client: &awc::Client, endpoint: &Endpoint) -> Option<SpecCounts> {
    let mut response = client.get(endpoint.metrics()).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body = response.body().limit(16 << 20).await.ok()?;
    parse_spec_counters(&String::from_utf8_lossy(&body))
}

fn parse_spec_counters(text: &str) -> Option<SpecCounts> {
    let mut counts = SpecCounts::default();
    let mut found = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let name = series.split('{').next().unwrap_or_default();
        let Ok(value) = value.parse::<f64>() else { continue };
        let slot = match name {
            SPEC_DRAFTS => &mut counts.steps,
            SPEC_DRAFT_TOKENS => &mut counts.drafted,
            SPEC_ACCEPTED_TOKENS => &mut counts.accepted,
            _ => continue,
        };
        *slot += value as u64;
        found = true;
    }
    found.then_some(counts)
}

/// What the counters gained between two readings; `None` when no drafts were verified.
pub fn counters_delta(before: Option<SpecCounts>, after: Option<SpecCounts>) -> Option<SpecCounts> {
    let (before, after) = (before?, after?);
    let delta = SpecCounts {
        steps: after.steps.saturating_sub(before.steps),
        drafted: after.drafted.saturating_sub(before.drafted),
        accepted: after.accepted.saturating_sub(before.accepted),
        synthetic: false,
    };
    (delta.steps > 0).then_some(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_routes_derived() {
        let e = Endpoint::parse("http://127.0.0.1:8000/").unwrap();
        assert_eq!(e.completions(), "http://127.0.0.1:8000/v1/completions");
        assert_eq!(e.websocket(), "ws://127.0.0.1:8000/v1/ws");
        assert_eq!(e.metrics(), "http://127.0.0.1:8000/metrics");
        assert_eq!(Endpoint::parse("localhost:8080/v1").unwrap().base(), "http://localhost:8080");
        assert_eq!(Endpoint::parse("http://h:1/llm/v1/").unwrap().websocket(), "ws://h:1/llm/v1/ws");
        for (url, reason) in [
            ("https://h:1", "HTTPS is not supported"),
            ("ftp://h", "scheme must be http"),
            ("http://", "invalid"),
            ("http://h:1/?a=1", "no query"),
            ("http://h h", "invalid"),
        ] {
            match Endpoint::parse(url) {
                Err(BenchError::BadUrl { reason: r, .. }) => assert!(r.contains(reason), "{url}: {r}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[test]
    fn speculation_counters_are_read_from_the_prometheus_text() {
        let text = "# TYPE specula_spec_drafts_total counter\nspecula_spec_drafts_total 10\n\
                    specula_spec_draft_tokens_total 40\nspecula_spec_accepted_tokens_total 25\n\
                    specula_spec_accepted_by_position_total{position=\"1\"} 9\nspecula_steps_total 99\n";
        let c = parse_spec_counters(text).unwrap();
        assert_eq!((c.steps, c.drafted, c.accepted), (10, 40, 25));
        assert_eq!(parse_spec_counters("specula_steps_total 3\n"), None);
        let later = SpecCounts { steps: 14, drafted: 56, accepted: 30, synthetic: false };
        let d = counters_delta(Some(c), Some(later)).unwrap();
        assert_eq!((d.steps, d.drafted, d.accepted), (4, 16, 5));
        assert_eq!(counters_delta(Some(c), Some(c)), None);
        assert_eq!(counters_delta(None, Some(c)), None);
    }
}
