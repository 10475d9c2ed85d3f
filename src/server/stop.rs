//! Stopping gracefully: every client hears how its requests ended.
//!
//! ```text
//!  stop(drain)
//!   ├─ WebSocket connections: no new requests (`shutting_down`); each closes (1001) once
//!   │  its last request has sent its final frame
//!   ├─ the listener: no new connections; open ones get until drain + a grace period
//!   └─ the runtime: requests in flight run for up to `drain`, the rest fail with
//!      `shutting_down` (WebSocket: an `error` frame; SSE: an error chunk, then [DONE])
//! ```

use std::time::Duration;

use actix_web::dev::ServerHandle;
use tokio_util::sync::CancellationToken;

use crate::actors::RuntimeHandle;

/// Stops a running server (see `server::bind`); cloneable, and stopping twice is harmless.
#[derive(Clone)]
pub struct Stopper {
    server: ServerHandle,
    runtime: RuntimeHandle,
    stopping: CancellationToken,
}

impl Stopper {
    pub(super) fn new(server: ServerHandle, runtime: RuntimeHandle, stopping: CancellationToken) -> Self {
        Stopper { server, runtime, stopping }
    }

    /// Stops taking connections and requests, lets those in flight finish for up to
    /// `drain`, fails the rest, and returns once every connection has closed (or the
    /// grace period after `drain` is over) and the runtime has stopped.
    pub async fn stop(&self, drain: Duration) {
        self.stopping.cancel();
        // Graceful: the listener closes now, connections are waited for.
        let server = self.server.stop(true);
        self.runtime.shutdown(drain).await;
        server.await;
    }
}
