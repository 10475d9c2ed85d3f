//! The server layer's one error type: what went wrong with a request as the network sees
//! it, mapped to an HTTP status and OpenAI's error JSON, or to a WebSocket error frame's
//! `code`.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::request::RequestError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServerError {
    /// The body or frame is not JSON at all.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// JSON of the wrong shape: a missing or unknown field, a wrong type.
    #[error("{0}")]
    InvalidRequest(String),
    /// A WebSocket frame whose `type` is neither `generate` nor `cancel`.
    #[error("unknown frame type `{0}`; expected `generate` or `cancel`")]
    UnknownType(String),
    /// A WebSocket `generate` reusing the id of a request still in flight.
    #[error("request id {0} is already in flight on this connection")]
    DuplicateId(String),
    /// A WebSocket `cancel` for an id with nothing in flight (it may have just finished).
    #[error("no request with id {0} is in flight on this connection")]
    UnknownId(String),
    /// A WebSocket `generate` beyond the requests one connection may have in flight.
    #[error("at most {0} requests may be in flight on one connection; wait for one to finish")]
    TooManyInFlight(usize),
    #[error("the request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the request body did not arrive within {} s", .0.as_secs_f64())]
    BodyTimeout(std::time::Duration),
    #[error("missing or invalid API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("no route for {0}")]
    NotFound(String),
    /// Refused or failed by the runtime.
    #[error(transparent)]
    Request(#[from] RequestError),
}

impl ServerError {
    /// A stable, machine-readable name (the WebSocket `code`, OpenAI's `error.code`).
    pub fn code(&self) -> &'static str {
        match self {
            ServerError::InvalidJson(_) => "invalid_json",
            ServerError::InvalidRequest(_) => "invalid_request",
            ServerError::UnknownType(_) => "unknown_type",
            ServerError::DuplicateId(_) => "duplicate_id",
            ServerError::UnknownId(_) => "unknown_id",
            ServerError::TooManyInFlight(_) => "too_many_in_flight",
            ServerError::PayloadTooLarge(_) => "payload_too_large",
            ServerError::BodyTimeout(_) => "request_timeout",
            ServerError::Unauthorized => "invalid_api_key",
            ServerError::NotFound(_) => "not_found",
            ServerError::Request(e) => e.code(),
        }
    }

    /// OpenAI's error `type`.
    pub fn kind(&self) -> &'static str {
        match self.status_code() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The OpenAI error body: `{"error": {"message", "type", "code"}}`.
    pub fn openai_json(&self) -> serde_json::Value {
        json!({ "error": { "message": self.to_string(), "type": self.kind(), "code": self.code() } })
    }
}

impl ResponseError for ServerError {
    fn status_code(&self) -> StatusCode {
        match self {
            ServerError::Unauthorized => StatusCode::UNAUTHORIZED,
            ServerError::NotFound(_) => StatusCode::NOT_FOUND,
            ServerError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServerError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ServerError::Request(
                RequestError::Overloaded(_) | RequestError::ShuttingDown | RequestError::Unavailable(_),
            ) => StatusCode::SERVICE_UNAVAILABLE,
            ServerError::Request(RequestError::Internal(_) | RequestError::StepFailed(_)) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, ServerError::Unauthorized) {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        if matches!(self, ServerError::PayloadTooLarge(_) | ServerError::BodyTimeout(_)) {
            // The rest of the body is not read: the connection cannot carry another request.
            response.force_close();
        }
        response.json(self.openai_json())
    }
}

/// A serde error as a client should read it: which field, what was wrong.
pub fn from_serde(e: serde_json::Error) -> ServerError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ServerError::InvalidJson(e.to_string()),
        Category::Data => ServerError::InvalidRequest(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes() {
        let too_long = ServerError::from(RequestError::PromptTooLong { tokens: 9000, context: 8192 });
        assert_eq!(too_long.status_code(), StatusCode::BAD_REQUEST);
        assert_eq!(too_long.code(), "context_length_exceeded");
        let busy = ServerError::from(RequestError::Overloaded(64));
        assert_eq!(busy.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.kind(), "server_error");
        assert_eq!(ServerError::Unauthorized.status_code(), StatusCode::UNAUTHORIZED);
        let body = ServerError::InvalidRequest("missing field `messages`".into()).openai_json();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_request");
        assert_eq!(body["error"]["message"], "missing field `messages`");
    }

    #[test]
    fn serde_errors_are_classified() {
        let syntax = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        assert_eq!(from_serde(syntax).code(), "invalid_json");
        let data = serde_json::from_str::<u32>("\"x\"").unwrap_err();
        assert_eq!(from_serde(data).code(), "invalid_request");
    }
}
