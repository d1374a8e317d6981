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
        };
        for attempt in 0..5 {
            let id = format!("subscribed{attempt}");
            c.ctr_ok(&[
                "run",
                "--rm",
                "--runtime",
                STASIS_RUNTIME,
                image,
                &id,
                "true",
            ])?;
            if w.wait("/tasks/start", &id, Duration::from_secs(5)).is_ok() {
                return Ok(w);
            }
        }
        bail!("ctr events never delivered anything")
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
