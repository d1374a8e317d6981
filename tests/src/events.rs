//! containerd's event stream as a test reads it.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{Containerd, STASIS_RUNTIME};

/// `ctr events` of a containerd, read as it arrives, so a test waits for the event itself.
pub struct EventWatch {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    /// How much of `seen` earlier marks returned, and how many marks were made.
    consumed: usize,
    marks: usize,
}

impl EventWatch {
    /// Starts `ctr events` and returns once it is subscribed: a throwaway container's start
    /// event has come through (no fixed wait).
    pub fn start(c: &Containerd, image: &str) -> Result<EventWatch> {
        let mut child = c
            .ctr_command()
            .arg("events")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("events stdout")?;
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut w = EventWatch {
            child,
            lines,
            seen: Vec::new(),
            consumed: 0,
            marks: 0,
        };
        for attempt in 0..5 {
            let id = format!("subscribed{attempt}");
            if w.run_and_see(c, image, &id, Duration::from_secs(5)).is_ok() {
                return Ok(w);
            }
        }
        bail!("ctr events never delivered anything")
    }

    /// The events that arrived since the last mark (or the start), every one of them: a
    /// throwaway container is run as a barrier, and once its start event is in, everything
    /// published before it is too. The harness's own barrier and subscription containers
    /// are left out.
    pub fn mark(&mut self, c: &Containerd, image: &str) -> Result<Vec<String>> {
        self.marks += 1;
        let id = format!("barrier{}", self.marks);
        self.run_and_see(c, image, &id, Duration::from_secs(15))?;
        let window = self.seen.split_off(self.consumed);
        let own = |l: &String| l.contains("barrier") || l.contains("subscribed");
        let events: Vec<String> = window.iter().filter(|l| !own(l)).cloned().collect();
        self.seen.extend(window);
        self.consumed = self.seen.len();
        Ok(events)
    }

    /// Runs a throwaway container `id` and waits for its start event.
    fn run_and_see(
        &mut self,
        c: &Containerd,
        image: &str,
        id: &str,
        within: Duration,
    ) -> Result<()> {
        c.ctr_ok(&[
            "run",
            "--rm",
            "--runtime",
            STASIS_RUNTIME,
            image,
            id,
            "true",
        ])?;
        self.wait("/tasks/start", id, within).map(drop)
    }

    /// Waits until an event of `topic` mentioning `needle` has arrived.
    pub fn wait(&mut self, topic: &str, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .seen
                .iter()
                .find(|l| l.contains(topic) && l.contains(needle))
            {
                return Ok(l.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no {topic} event for {needle} within {timeout:?}; saw:\n{}",
                    self.seen.join("\n")
                );
            }
            if let Ok(l) = self.lines.recv_timeout(left) {
                self.seen.push(l);
            }
        }
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails naming them if `events` (a [`EventWatch::mark`] window) hold the creation of a
/// container or a task: what a restore refused "before any container" must not have.
pub fn expect_no_creation(events: &[String]) -> Result<()> {
    let made: Vec<_> = events
        .iter()
        .filter(|l| l.contains("/containers/create") || l.contains("/tasks/create"))
        .collect();
    if !made.is_empty() {
        bail!("containerd created containers or tasks: {made:#?}");
    }
    Ok(())
}
