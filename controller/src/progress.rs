//! Progress of long work, for whoever waits on it: live lines on a terminal (an indicatif
//! bar for byte counts), plain lines when stderr is not a terminal, or JSON lines on stdout
//! (`--format json`) ending with one `result` event. Operations report steps and bytes here
//! and never print progress themselves. Nothing here runs inside a pod's frozen window: the
//! shim's freeze is one call, and its steps are reported when it returns.
//!
//! JSON lines (one object each, stable field names): `time` (seconds since the epoch),
//! `elapsed_ms` (since the command began), `operation`, `phase`, and per kind `message`
//! (a step), `done`/`total` (bytes of the phase so far, of the estimate: 0 when not known),
//! or `ok` with the command's result fields or `error` (the last line).

use std::{
    io::IsTerminal,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Map, Value};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Style {
    /// A terminal: steps as lines, bytes as a live bar (stderr).
    Live,
    /// Steps and byte counts as plain lines on stderr, bytes at most every few seconds.
    Lines,
    /// JSON lines on stdout.
    Json,
}

struct Reporter {
    style: Style,
    operation: String,
    started: Instant,
    /// Serialises the output of the steps and of a byte ticker.
    out: Mutex<()>,
    /// `pod_id` and `pod_name` once known: on every later JSON line.
    pod: Mutex<Map<String, Value>>,
}

static REPORTER: OnceLock<Reporter> = OnceLock::new();
/// Bytes of the running byte phase (archive writers add to it).
static BYTES: AtomicU64 = AtomicU64::new(0);

/// Chooses how this process reports `operation` (once; later calls change nothing).
pub fn start(operation: &str, json: bool) {
    let style = if json {
        Style::Json
    } else if std::io::stderr().is_terminal() {
        Style::Live
    } else {
        Style::Lines
    };
    let _ = REPORTER.set(Reporter {
        style,
        operation: operation.to_string(),
        started: Instant::now(),
        out: Mutex::new(()),
        pod: Mutex::new(Map::new()),
    });
}

fn reporter() -> &'static Reporter {
    REPORTER.get_or_init(|| Reporter {
        style: Style::Lines,
        operation: String::new(),
        started: Instant::now(),
        out: Mutex::new(()),
        pod: Mutex::new(Map::new()),
    })
}

/// The pod the operation works on, once known (a restore learns its new pod's id late):
/// every later JSON line names it, so that a script can follow one pod.
pub fn pod(id: &str, name: &str) {
    let mut pod = reporter().pod.lock().unwrap_or_else(|e| e.into_inner());
    pod.insert("pod_id".into(), json!(id));
    if !name.is_empty() {
        pod.insert("pod_name".into(), json!(name));
    }
}

/// Whether this process reports in JSON lines (then results are a `result` event too).
pub fn is_json() -> bool {
    reporter().style == Style::Json
}

fn event(r: &Reporter, phase: &str, fields: Map<String, Value>) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let mut obj = Map::new();
    obj.insert("time".into(), json!(now));
    obj.insert(
        "elapsed_ms".into(),
        json!((r.started.elapsed().as_secs_f64() * 1e4).round() / 10.0),
    );
    obj.insert("operation".into(), json!(r.operation));
    obj.insert("phase".into(), json!(phase));
    obj.extend(r.pod.lock().unwrap_or_else(|e| e.into_inner()).clone());
    obj.extend(fields);
    Value::Object(obj)
}

fn emit_json(v: &Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// A step of the operation: `phase` names it for scripts, `message` says it for people.
pub fn step(phase: &str, message: impl AsRef<str>) {
    // In the log too, inside the operation's span (pod and operation named there).
    tracing::debug!(phase, "{}", message.as_ref());
    let r = reporter();
    let _held = r.out.lock();
    match r.style {
        Style::Json => {
            let mut f = Map::new();
            f.insert("message".into(), json!(message.as_ref()));
            emit_json(&event(r, phase, f));
        }
        _ => eprintln!("{}", message.as_ref()),
    }
}

/// The command's end: `ok` with its result fields, or its error. JSON only: text output
/// prints results and errors its own way.
pub fn result(outcome: Result<Value, &anyhow::Error>) {
    let r = reporter();
    if r.style != Style::Json {
        return;
    }
    let mut f = Map::new();
    match outcome {
        Ok(Value::Object(fields)) => {
            f.insert("ok".into(), json!(true));
            f.extend(fields);
        }
        Ok(other) => {
            f.insert("ok".into(), json!(true));
            f.insert("value".into(), other);
        }
        Err(e) => {
            f.insert("ok".into(), json!(false));
            f.insert("error".into(), json!(format!("{e:#}")));
        }
    }
    let _held = r.out.lock();
    emit_json(&event(r, "result", f));
}

/// A part of the work with a state of its own (a layer of an image push or pull): a line
/// for people, or a JSON event with `part`, `state`, `done` and `total`.
pub fn part(phase: &str, name: &str, state: &str, done: u64, total: u64) {
    let r = reporter();
    let _held = r.out.lock();
    match r.style {
        Style::Json => {
            let mut f = Map::new();
            f.insert("part".into(), json!(name));
            f.insert("state".into(), json!(state));
            f.insert("done".into(), json!(done));
            f.insert("total".into(), json!(total));
            emit_json(&event(r, phase, f));
        }
        _ if name.is_empty() => eprintln!("{state}"),
        _ if total > 0 => eprintln!(
            "{name}: {state} ({} of {})",
            crate::display::human(done),
            crate::display::human(total)
        ),
        _ => eprintln!("{name}: {state}"),
    }
}

/// Counts `n` bytes of the running byte phase.
pub fn count(n: u64) {
    BYTES.fetch_add(n, Ordering::Relaxed);
}

/// A writer that counts what passes through it into the running byte phase.
pub struct Counting<W>(pub W);

impl<W: std::io::Write> std::io::Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        count(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A reader that counts what is read through it into the running byte phase.
pub struct CountingRead<R>(pub R);

impl<R: std::io::Read> std::io::Read for CountingRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        count(n as u64);
        Ok(n)
    }
}

/// Sets the running byte phase's count (for counts that come from elsewhere: a shim's).
pub fn set(n: u64) {
    BYTES.store(n, Ordering::Relaxed);
}

/// A phase measured in bytes (of an estimated `total`), reported while it lasts by a
/// thread of its own; ended (a last report) when dropped.
pub struct Bytes {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts reporting the byte phase `phase` ("writing the archive"); `total` 0 when it is
/// not known beforehand (a migration stream).
pub fn bytes(phase: &str, message: &str, total: u64) -> Bytes {
    bytes_from(phase, message, total, 0)
}

/// [`bytes`] of which `done` are done already.
pub fn bytes_from(phase: &str, message: &str, total: u64, done: u64) -> Bytes {
    BYTES.store(done, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let (phase, message, flag) = (phase.to_string(), message.to_string(), stop.clone());
    let thread = std::thread::spawn(move || tick(&phase, &message, total, &flag));
    Bytes {
        stop,
        thread: Some(thread),
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // Wakes the reporter from its wait: the phase's end must not wait for a tick
            // (an eager restore's answer waited up to 50 ms here).
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn tick(phase: &str, message: &str, total: u64, stop: &AtomicBool) {
    let r = reporter();
    let (every, bar) = match r.style {
        Style::Live => (Duration::from_millis(100), Some(live_bar(message, total))),
        Style::Lines => (Duration::from_secs(2), None),
        Style::Json => (Duration::from_millis(500), None),
    };
    // The phase's start is reported at once, then every `every`.
    let mut last_report: Option<Instant> = None;
    let mut reported = None;
    loop {
        let done = stop.load(Ordering::SeqCst);
        let wait = last_report.map_or(Duration::ZERO, |t| every.saturating_sub(t.elapsed()));
        if !done && !wait.is_zero() {
            // Until the next report is due; the phase's end unparks it at once.
            std::thread::park_timeout(wait);
            continue;
        }
        last_report = Some(Instant::now());
        let n = BYTES.load(Ordering::Relaxed);
        if reported != Some(n) || done {
            reported = Some(n);
            let _held = r.out.lock();
            match (&bar, r.style) {
                (Some(b), _) => b.set_position(n),
                (None, Style::Json) => {
                    let mut f = Map::new();
                    f.insert("done".into(), json!(n));
                    f.insert("total".into(), json!(total));
                    emit_json(&event(r, phase, f));
                }
                (None, _) if total == 0 => {
                    eprintln!("{message}: {}", crate::display::human(n))
                }
                (None, _) => eprintln!(
                    "{message}: {} of ~{}",
                    crate::display::human(n),
                    crate::display::human(total)
                ),
            }
        }
        if done {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return;
        }
    }
}

fn live_bar(message: &str, total: u64) -> indicatif::ProgressBar {
    let (bar, template) = if total == 0 {
        (
            indicatif::ProgressBar::no_length(),
            "{msg}: {bytes} {spinner} {bytes_per_sec}, {elapsed}",
        )
    } else {
        (
            indicatif::ProgressBar::new(total),
            "{msg}: {bytes}/~{total_bytes} {wide_bar} {bytes_per_sec}, {elapsed}",
        )
    };
    let style = indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(message.to_string());
    bar
}
