//! Watching an ordering claim from outside: a thread samples the host's state (freezer
//! states, which helper processes run) every few milliseconds while an operation runs, and
//! the test asserts its invariant over every sample, not just over the end state.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// A running sampler of `T`; [`Sampler::stop`] returns what it saw, oldest first.
pub struct Sampler<T> {
    started: Instant,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<(Duration, T)>>>,
}

impl<T: Send + 'static> Sampler<T> {
    /// Samples `look` every `every` (as fast as it returns, if slower) until stopped.
    pub fn start(every: Duration, mut look: impl FnMut() -> T + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let start = started;
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                seen.push((start.elapsed(), look()));
                std::thread::sleep(every);
            }
            // One more after the operation returned: its end state belongs to the record.
            seen.push((start.elapsed(), look()));
            seen
        });
        Self {
            started,
            stop,
            thread: Some(thread),
        }
    }

    /// When this instant happened on the samples' clock (to set a test's own events, such
    /// as a request returning, against the samples).
    pub fn at(&self, instant: Instant) -> Duration {
        instant.saturating_duration_since(self.started)
    }

    pub fn stop(mut self) -> Vec<(Duration, T)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl<T> Drop for Sampler<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Pids of processes whose executable's file name is `name` (criu, runc), host-wide.
pub fn pids_of_exe(name: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            (exe.file_name()? == name).then_some(pid)
        })
        .collect()
}
