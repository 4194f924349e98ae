//! Era translation for multi-round-trip requests (2026-07-28 `InputRequiredResult`).
//!
//! A 2026-07-28 upstream asks for client input by answering `tools/call`, `prompts/get` or
//! `resources/read` with `{"resultType":"input_required","inputRequests":{key:{method,params}},
//! "requestState":…}` and expects the same request again with `inputResponses` and the echoed
//! `requestState`. A session-era client knows nothing of that but answers server-to-client
//! requests, so for such a caller Portcullis asks each embedded request on the caller's own
//! stream, collects the answers and retries: the client sees a sampling or elicitation request
//! followed by the final result, as if the upstream spoke its era. Invariant: the whole exchange
//! stays inside the original call's deadline, and a client's error answer ends the call with
//! that error rather than being retried.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::mcp::jsonrpc::{self, Envelope, Kind, RawObject, Reply};
use crate::mcp::session::{Caller, ClientRequestRoute, Session};

/// At most this many rounds of input before the call is failed (a loop guard).
pub(crate) const MAX_ROUNDS: usize = 8;

/// Why a round of input requests failed: the upstream's `InputRequiredResult` is malformed, or
/// the session-era client could not be asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The `InputRequiredResult` is not what the protocol says.
    #[error("{0}")]
    Malformed(String),
    /// The client has no stream to carry the request.
    #[error("the client has no open stream to receive {0}")]
    NoStream(String),
    /// The client's session ended first.
    #[error("the client session ended before answering {0}")]
    SessionEnded(String),
    /// The client did not answer by the call's deadline.
    #[error("the client did not answer {0} in time")]
    Late(String),
    /// The client's answer is not a response.
    #[error("the client's answer to {0} is not a JSON-RPC response")]
    NotAResponse(String),
    /// The upstream kept asking.
    #[error("more than {MAX_ROUNDS} rounds of input requests")]
    TooManyRounds,
}

/// One round's input requests, parsed from an `InputRequiredResult`.
pub(crate) struct InputRequired {
    /// `(key, method, params)` for every embedded request.
    pub requests: Vec<(String, String, Option<String>)>,
    /// The opaque state to echo back, raw JSON.
    pub state: Option<String>,
}

/// Recognises an `InputRequiredResult`: a cheap substring test first, so ordinary results are
/// never parsed.
pub(crate) fn input_required(payload: &str) -> Option<Result<InputRequired, InputError>> {
    if !payload.contains("input_required") {
        return None;
    }
    let raw: &serde_json::value::RawValue = serde_json::from_str(payload).ok()?;
    let obj = RawObject::parse(raw).ok()?;
    if obj.get_str("resultType").as_deref() != Some("input_required") {
        return None;
    }
    Some(parse(&obj))
}

fn parse(obj: &RawObject<'_>) -> Result<InputRequired, InputError> {
    let bad = InputError::Malformed;
    let mut requests = Vec::new();
    if let Some(reqs) = obj.get("inputRequests").filter(|v| v.get() != "null") {
        let reqs = RawObject::parse(reqs).map_err(|e| bad(format!("inputRequests must be an object: {e}")))?;
        for (key, value) in &reqs.0 {
            let req =
                RawObject::parse(value).map_err(|e| bad(format!("input request {key} must be an object: {e}")))?;
            let method = req.get_str("method").ok_or_else(|| bad(format!("input request {key} has no method")))?;
            requests.push((key.to_string(), method, req.get("params").map(|p| p.get().to_owned())));
        }
    }
    let state = obj.get("requestState").filter(|v| v.get() != "null").map(|v| v.get().to_owned());
    if requests.is_empty() && state.is_none() {
        return Err(bad("an input_required result with neither inputRequests nor requestState".into()));
    }
    Ok(InputRequired { requests, state })
}

/// What asking the client produced.
pub(crate) enum Answer {
    /// The client's result, raw JSON.
    Result(String),
    /// The client answered with an error: the call ends with it.
    Refused(Reply),
}

/// Sends one request to a session-era client on the caller's stream and waits for its answer.
pub(crate) async fn ask(
    session: &Arc<Session>,
    caller: &Caller,
    method: &str,
    params: Option<&str>,
    deadline: Instant,
) -> Result<Answer, InputError> {
    let (tx, rx) = oneshot::channel();
    let n = session.add_client_request(ClientRequestRoute::Local(tx));
    let msg = jsonrpc::request(&format!("\"pcs-{n}\""), method, params);
    if !caller.deliver(Bytes::from(msg)) {
        session.take_client_request(n);
        return Err(InputError::NoStream(method.to_owned()));
    }
    let bytes = match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => return Err(InputError::SessionEnded(method.to_owned())),
        Err(_) => {
            session.take_client_request(n);
            return Err(InputError::Late(method.to_owned()));
        }
    };
    let env = Envelope::parse(&bytes).map_err(|_| InputError::NotAResponse(method.to_owned()))?;
    match (env.kind, env.result, env.error) {
        (Kind::Result, Some(r), _) => Ok(Answer::Result(r.get().to_owned())),
        (Kind::Error, _, Some(e)) => {
            let span = jsonrpc::span_of(&bytes, e);
            Ok(Answer::Refused(Reply { bytes: bytes.clone(), span, is_error: true, extra: "", stateless: false }))
        }
        _ => Err(InputError::NotAResponse(method.to_owned())),
    }
}

/// The `inputResponses` object for a round's answers.
pub(crate) fn responses_json(answers: &[(String, String)]) -> String {
    let mut out = String::from("{");
    for (i, (key, value)) in answers.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&jsonrpc::quote(key));
        out.push(':');
        out.push_str(value);
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_results_are_not_parsed() {
        assert!(input_required(r#"{"content":[{"type":"text","text":"hi"}]}"#).is_none());
        assert!(input_required(r#"{"content":[{"type":"text","text":"input_required"}]}"#).is_none());
    }

    #[test]
    fn parses_requests_and_state() {
        let r = input_required(
            r#"{"resultType":"input_required","inputRequests":{"s":{"method":"sampling/createMessage","params":{"maxTokens":5}}},"requestState":"abc"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.requests, vec![("s".into(), "sampling/createMessage".into(), Some(r#"{"maxTokens":5}"#.into()))]);
        assert_eq!(r.state.as_deref(), Some(r#""abc""#));
        assert!(input_required(r#"{"resultType":"input_required"}"#).unwrap().is_err());
    }

    #[test]
    fn builds_responses() {
        let json = responses_json(&[("a".into(), "{}".into()), ("b\"".into(), "[1]".into())]);
        assert_eq!(json, r#"{"a":{},"b\"":[1]}"#);
    }
}
