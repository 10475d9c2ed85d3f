//! Request bodies under the limits: read whole within the size limit and the deadline, and
//! a body the server stopped reading closes its connection.
//!
//! actix drains a chunked body that a handler dropped for as long as the client keeps
//! sending, without a deadline, so a 413 on a chunked upload (or a trickled body to any
//! route) would hold the connection. But it closes a connection whose request body is
//! still unread, and not dropped, when the response ends: `keep_unread_body` keeps each
//! body alive until then.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{self, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::HttpRequest;
use futures::{Stream, StreamExt};

use super::error::ServerError;
use super::limits::Limits;

/// Reads a request body whole: 413 beyond `max_body_bytes` (at once when the declared
/// length says so), 408 when it has not arrived within `body_timeout`.
pub async fn read_body(req: &HttpRequest, mut payload: web::Payload, limits: &Limits) -> Result<Bytes, ServerError> {
    let too_large = ServerError::PayloadTooLarge(limits.max_body_bytes);
    if declared_length(req).is_some_and(|n| n > limits.max_body_bytes as u64) {
        return Err(too_large);
    }
    let read = async {
        let mut body = BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ServerError::InvalidRequest(format!("the request body ended early: {e}")))?;
            if body.len() + chunk.len() > limits.max_body_bytes {
                return Err(too_large);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(limits.body_timeout, read).await.map_err(|_| ServerError::BodyTimeout(limits.body_timeout))?
}

fn declared_length(req: &HttpRequest) -> Option<u64> {
    req.headers().get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A request payload made of any stream of bytes.
pub fn payload_of(stream: impl Stream<Item = Result<Bytes, PayloadError>> + 'static) -> dev::Payload {
    let stream: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> = Box::pin(stream);
    dev::Payload::Stream { payload: stream }
}

/// A request body shared between the handler, which reads it, and the response, which
/// keeps it alive until the response ends.
#[derive(Clone)]
struct SharedPayload(Rc<RefCell<dev::Payload>>);

impl Stream for SharedPayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_next(cx)
    }
}

/// A response body that holds its request's body until it ends.
pub struct HoldingBody {
    body: BoxBody,
    _request_body: Option<SharedPayload>,
}

impl MessageBody for HoldingBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.body).poll_next(cx)
    }
}

/// Middleware (`middleware::from_fn`): the request body, when there is one, lives until
/// the response has been sent, so that a body nobody read to its end closes the connection
/// instead of being drained.
pub async fn keep_unread_body(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<HoldingBody>, actix_web::Error> {
    let (http_req, payload) = req.into_parts();
    let shared = match payload {
        dev::Payload::None => None,
        payload => Some(SharedPayload(Rc::new(RefCell::new(payload)))),
    };
    let payload = match &shared {
        Some(s) => payload_of(s.clone()),
        None => dev::Payload::None,
    };
    let response = next.call(ServiceRequest::from_parts(http_req, payload)).await?;
    Ok(response.map_body(|_, body| HoldingBody { body: body.boxed(), _request_body: shared }))
}
