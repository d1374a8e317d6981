//! A helper thread that checks the chunks the lazy-pages daemon will ask for next, so that
//! the page server answers from checked memory while the next chunks are read and hashed on
//! the other core. The bytes it hands over are the bytes it checked.

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use log::warn;

use super::chunks::SpanBytes;

/// How many chunks are checked ahead of the last request (8 MiB at 1 MiB chunks: two of the
/// daemon's largest requests).
const AHEAD_CHUNKS: u64 = 8;

/// How far ahead of the chunk being checked the kernel is asked to read (32 MiB at 1 MiB
/// chunks), so that the disk works while chunks are hashed and served.
const HINT_CHUNKS: u64 = 32;

/// Requests at least this long are the daemon's background transfer (it starts at 64 KiB),
/// which walks each image in order; shorter ones are faults, anywhere.
pub(super) const FOLLOWED_REQUEST: u64 = 64 << 10;

#[derive(Default)]
struct State {
    /// The span and the chunks `first..end` wanted next.
    want: Option<(usize, u64, u64)>,
    /// Chunks checked and not yet taken: (span, index) and their bytes.
    ready: VecDeque<((usize, u64), Vec<u8>)>,
    /// The chunk being checked now.
    busy: Option<(usize, u64)>,
    /// Time spent reading and hashing.
    worked: Duration,
    stop: bool,
}

pub(super) struct Ahead {
    state: Mutex<State>,
    changed: Condvar,
}

impl Ahead {
    /// Starts the helper for `spans`; None if no thread could be started (the server then
    /// checks every chunk itself).
    pub(super) fn start(id: &str, spans: Vec<Arc<SpanBytes>>) -> Option<Helper> {
        let ahead = Arc::new(Ahead {
            state: Mutex::default(),
            changed: Condvar::new(),
        });
        let helper = ahead.clone();
        match std::thread::Builder::new()
            .name(format!("ahead-{}", &id[..id.len().min(8)]))
            .spawn(move || helper.run(&spans))
        {
            Ok(_) => Some(Helper(ahead)),
            Err(e) => {
                warn!("{id}: no thread to check pages ahead ({e}); checking them as asked");
                None
            }
        }
    }

    fn run(&self, spans: &[Arc<SpanBytes>]) {
        // Per span: the chunk up to which the kernel was asked to read ahead.
        let mut hinted: std::collections::HashMap<usize, u64> = Default::default();
        let mut st = self.state.lock().unwrap();
        loop {
            if st.stop {
                return;
            }
            let past_end = |(span, first, end): &(usize, u64, u64)| {
                first >= end || spans.get(*span).is_none_or(|s| *first >= s.chunk_count())
            };
            let Some((span, first, end)) = st.want.filter(|w| !past_end(w)) else {
                st = self.changed.wait(st).unwrap();
                continue;
            };
            st.want = Some((span, first + 1, end));
            if st.ready.iter().any(|(k, _)| *k == (span, first)) {
                continue;
            }
            st.busy = Some((span, first));
            drop(st);
            let t = std::time::Instant::now();
            let hinted_to = hinted.entry(span).or_insert(0);
            if *hinted_to < first + HINT_CHUNKS / 2 {
                let from = (*hinted_to).max(first);
                spans[span].read_ahead(from, first + HINT_CHUNKS - from);
                *hinted_to = first + HINT_CHUNKS;
            }
            // A chunk that fails its check is left to the server, which fails on it if the
            // daemon asks for it.
            // Whatever happens in the check, `busy` is cleared below: the server may be
            // waiting for this chunk.
            let checked =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| spans[span].load(first)))
                    .unwrap_or_else(|_| Err("the check panicked".to_string()));
            st = self.state.lock().unwrap();
            st.worked += t.elapsed();
            st.busy = None;
            if let Ok(bytes) = checked {
                if st.ready.len() as u64 >= 2 * AHEAD_CHUNKS {
                    st.ready.pop_front();
                }
                st.ready.push_back(((span, first), bytes));
            }
            self.changed.notify_all();
        }
    }

    /// The chunks from `next` on in `span` are wanted next (replacing any earlier wish);
    /// chunks of that span before `next` are no longer needed.
    pub(super) fn want(&self, span: usize, next: u64) {
        let mut st = self.state.lock().unwrap();
        st.ready.retain(|((s, i), _)| *s != span || *i + 1 >= next);
        st.want = Some((span, next, next + AHEAD_CHUNKS));
        self.changed.notify_all();
    }

    /// Chunk `index` of `span` if the helper checked it (waiting while it is checking it).
    pub(super) fn take(&self, span: usize, index: u64) -> Option<Vec<u8>> {
        let mut st = self.state.lock().unwrap();
        loop {
            if let Some(pos) = st.ready.iter().position(|(k, _)| *k == (span, index)) {
                return st.ready.remove(pos).map(|(_, bytes)| bytes);
            }
            if st.busy != Some((span, index)) {
                return None;
            }
            st = self.changed.wait(st).unwrap();
        }
    }

    /// How long the helper has spent reading and checking.
    pub(super) fn busy_time(&self) -> Duration {
        self.state.lock().unwrap().worked
    }
}

/// The server's hold on the helper: the helper stops when it is dropped.
pub(super) struct Helper(Arc<Ahead>);

impl std::ops::Deref for Helper {
    type Target = Ahead;
    fn deref(&self) -> &Ahead {
        &self.0
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().stop = true;
        self.0.changed.notify_all();
    }
}
