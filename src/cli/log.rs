//! What the command line shows of the library's `tracing` events: on stderr, Specula's
//! from `info` up and everyone's warnings, one plain line each (`warning: ...`,
//! `error: ...`), as the commands have always printed them. `RUST_LOG` sets another filter
//! (`RUST_LOG=specula=debug` adds model loading and kernel compilation).

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The filter without `RUST_LOG`.
const DEFAULT_FILTER: &str = "warn,specula=info";

/// Installs the command line's subscriber (once; later calls change nothing).
pub fn install_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(PlainLine)
        .try_init();
}

/// An event as a line of text: the message and its fields, a level only where it matters.
struct PlainLine;

impl<S, N> FormatEvent<S, N> for PlainLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut out: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        match *event.metadata().level() {
            Level::ERROR => write!(out, "error: ")?,
            Level::WARN => write!(out, "warning: ")?,
            Level::INFO => {}
            Level::DEBUG => write!(out, "debug: ")?,
            Level::TRACE => write!(out, "trace: ")?,
        }
        ctx.field_format().format_fields(out.by_ref(), event)?;
        writeln!(out)
    }
}
