//! The optional API key: with one set, every route but `/health` needs
//! `Authorization: Bearer <key>` (the WebSocket upgrade included).

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};

use super::error::ServerError;
use super::AppState;

/// Routes that answer without a key.
const OPEN_PATHS: [&str; 1] = ["/health"];

/// An API key no client could send: refused at start rather than locking everyone out (or,
/// empty, silently serving without a key).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KeyError {
    #[error("the API key (--api-key or SPECULA_API_KEY) is empty; leave it unset to serve without a key")]
    Empty,
    #[error(
        "the API key (--api-key or SPECULA_API_KEY) has a space, a control or a non-ASCII character \
         at byte {0}; clients could never send it in an `Authorization: Bearer` header"
    )]
    Unsendable(usize),
}

/// Refuses a key that is empty or that an `Authorization` header cannot carry as sent
/// (whitespace is trimmed from the header, non-visible ASCII is not a header value).
pub fn check_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    match key.bytes().position(|b| !b.is_ascii_graphic()) {
        Some(at) => Err(KeyError::Unsendable(at)),
        None => Ok(()),
    }
}

/// Whether the request's `Authorization` header carries `key`.
pub fn is_authorized(authorization: Option<&str>, key: &str) -> bool {
    let Some(value) = authorization else { return false };
    let Some(token) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")) else {
        return false;
    };
    constant_time_eq(token.trim().as_bytes(), key.as_bytes())
}

/// Compares without an early exit, so that timing does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware (`middleware::from_fn`) refusing requests without the key.
pub async fn require_key(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let key = req.app_data::<web::Data<AppState>>().and_then(|s| s.api_key.clone());
    let allowed = match &key {
        None => true,
        Some(_) if OPEN_PATHS.contains(&req.path()) => true,
        Some(key) => {
            let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            is_authorized(auth, key)
        }
    };
    if allowed {
        Ok(next.call(req).await?.map_into_left_body())
    } else {
        let response = ServerError::Unauthorized.error_response();
        Ok(req.into_response(response).map_into_right_body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert!(is_authorized(Some("Bearer s3cret"), "s3cret"));
        assert!(!is_authorized(Some("Bearer s3cre"), "s3cret"));
        assert!(!is_authorized(Some("Bearer s3cretX"), "s3cret"));
        assert!(!is_authorized(Some("s3cret"), "s3cret"));
        assert!(!is_authorized(Some("Basic s3cret"), "s3cret"));
        assert!(!is_authorized(None, "s3cret"));
    }

    #[test]
    fn keys_no_client_could_send_are_refused() {
        assert_eq!(check_key("s3cret-KEY_0.9~+/="), Ok(()));
        assert_eq!(check_key(""), Err(KeyError::Empty));
        assert_eq!(check_key(" "), Err(KeyError::Unsendable(0)));
        assert_eq!(check_key("abc "), Err(KeyError::Unsendable(3)));
        assert_eq!(check_key("a\tb"), Err(KeyError::Unsendable(1)));
        assert_eq!(check_key("clé"), Err(KeyError::Unsendable(2)));
    }
}
