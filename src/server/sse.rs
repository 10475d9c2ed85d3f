//! Server-sent events framing for the OpenAI streams: `data: <json>\n\n` per chunk, then
//! `data: [DONE]\n\n`.

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::HttpResponse;
use futures::Stream;
use serde_json::Value;

/// One event carrying a JSON chunk.
pub fn data(chunk: &Value) -> Bytes {
    Bytes::from(format!("data: {chunk}\n\n"))
}

/// The event that ends every stream.
pub fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// A streaming response of SSE events, unbuffered by proxies.
pub fn response<S>(body: S) -> HttpResponse
where
    S: Stream<Item = Result<Bytes, actix_web::Error>> + 'static,
{
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(data(&serde_json::json!({"a": 1})), Bytes::from_static(b"data: {\"a\":1}\n\n"));
        assert_eq!(done(), Bytes::from_static(b"data: [DONE]\n\n"));
    }
}
