//! The shim's log: `tracing` spans and events (the `log` macros bridged in) written as one
//! logfmt line each to containerd's log fifo (`log` in the shim's working directory), the
//! way containerd collects shim logs: `time=… level=… pod=… op=… container=… msg=…`. Every
//! line carries the pod (the shim's `-id`: a pod's sandbox id, or the task group's id for a
//! shim without a pod); lines written inside an operation's span carry its `op` and
//! `container` too, so a failed operation's lines can be found by pod and container id.

use std::{fmt::Write as _, fs::File, io::Write, sync::Mutex};

use time::{format_description::well_known::Rfc3339, OffsetDateTime};
use tracing::{
    field::{Field, Visit},
    span, Event, Level, Subscriber,
};
use tracing_subscriber::{
    filter::LevelFilter, layer::Context, prelude::*, registry::LookupSpan, Layer,
};

/// Where lines go: containerd's fifo, or stderr when there is none (`delete`, by hand).
enum Sink {
    Fifo(Mutex<File>),
    Stderr,
}

struct Logfmt {
    sink: Sink,
    /// ` pod="…"`, on every line.
    base: String,
}

/// A span's fields, formatted once when it is made.
struct SpanFields(String);

/// Collects an event's or span's fields as ` key="value"`, the message apart; the `log.*`
/// fields the log bridge adds (target, file, line) are left out.
#[derive(Default)]
struct Pairs {
    message: String,
    pairs: String,
}

impl Visit for Pairs {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field.name(), value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.push(field.name(), &format!("{value:?}"));
    }
}

impl Pairs {
    fn push(&mut self, name: &str, value: &str) {
        if name == "message" {
            self.message = value.to_string();
        } else if !name.starts_with("log.") {
            let _ = write!(self.pairs, " {name}={}", quote(value));
        }
    }
}

/// A value as logfmt wants it: JSON-quoted, so that quotes and newlines in it cannot end the
/// field or start a fake line.
fn quote(v: &str) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Logfmt {
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = Pairs::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields.pairs));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Pairs::default();
        event.record(&mut fields);
        let mut spans = String::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(f) = span.extensions().get::<SpanFields>() {
                    spans.push_str(&f.0);
                }
            }
        }
        let now = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        let level = event.metadata().level().as_str().to_lowercase();
        // One write per line: containerd copies the fifo's bytes as they come, and lines of
        // several writers must not interleave.
        let line = format!(
            "time=\"{now}\" level={level}{}{spans}{} msg={}\n",
            self.base,
            fields.pairs,
            quote(&fields.message)
        );
        match &self.sink {
            Sink::Fifo(f) => {
                // A reader that went away (containerd restarting) must not stop the shim.
                let _ = f.lock().map(|mut f| f.write_all(line.as_bytes()));
            }
            Sink::Stderr => eprint!("{line}"),
        }
    }
}

/// Installs the shim's log for pod (or group) `id`: debug lines too with `debug`. The
/// `log` macros of the shim and of the crates it uses come through it as well.
pub fn init(debug: bool, id: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let sink = match std::fs::OpenOptions::new().write(true).open("log") {
        Ok(f) => Sink::Fifo(Mutex::new(f)),
        Err(_) => Sink::Stderr,
    };
    let level = if debug { Level::DEBUG } else { Level::INFO };
    let layer = Logfmt {
        sink,
        base: format!(" pod={}", quote(id)),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(LevelFilter::from_level(level)))
        .try_init()?;
    log::set_max_level(if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_so_that_they_cannot_start_a_line() {
        assert_eq!(quote("a\"b\nc"), r#""a\"b\nc""#);
        let mut p = Pairs::default();
        p.push("message", "hello");
        p.push("log.target", "x");
        p.push("container", "c1");
        assert_eq!(p.message, "hello");
        assert_eq!(p.pairs, r#" container="c1""#);
    }
}
