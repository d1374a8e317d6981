//! Stepping in between two steps of the product, deterministically: fanotify's permission
//! events hold a process's `open` of a file until the test answers, so the test can change
//! the file between the product writing it and reading it back.

use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use anyhow::{bail, Context, Result};

/// Holds every open of a file named `name` in one directory until `act` has run on it (the
/// file, opened read-write for the test); other opens in that directory pass untouched.
/// Dropped, it stops; opens pending then are allowed by the kernel.
pub struct OpenInterceptor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl OpenInterceptor {
    pub fn start(dir: &Path, name: &str, act: impl FnMut(&File) + Send + 'static) -> Result<Self> {
        let name = name.to_string();
        Self::start_matching(dir, move |n| n == name, act)
    }

    /// [`OpenInterceptor::start`] for every file whose name `matches` says.
    pub fn start_matching(
        dir: &Path,
        matches: impl Fn(&str) -> bool + Send + 'static,
        mut act: impl FnMut(&File) + Send + 'static,
    ) -> Result<Self> {
        // SAFETY: plain syscalls; the returned descriptor is owned below.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC,
                (libc::O_RDWR | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32,
            )
        };
        if fd < 0 {
            bail!("fanotify_init: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us and is not owned elsewhere.
        let fan = unsafe { OwnedFd::from_raw_fd(fd) };
        let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
        // SAFETY: valid descriptor and NUL-terminated path.
        let marked = unsafe {
            libc::fanotify_mark(
                fan.as_raw_fd(),
                libc::FAN_MARK_ADD,
                libc::FAN_OPEN_PERM | libc::FAN_EVENT_ON_CHILD,
                libc::AT_FDCWD,
                c_dir.as_ptr(),
            )
        };
        if marked < 0 {
            bail!(
                "fanotify_mark {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut acted = 0;
            let mut buf = [0u8; 4096];
            while !flag.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: fan.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                    continue;
                }
                // SAFETY: reading into a buffer of its length.
                let n = unsafe { libc::read(fan.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    continue;
                }
                let mut at = 0usize;
                let size = std::mem::size_of::<libc::fanotify_event_metadata>();
                while at + size <= n as usize {
                    // SAFETY: the kernel wrote a whole event here; read unaligned.
                    let ev: libc::fanotify_event_metadata =
                        unsafe { std::ptr::read_unaligned(buf.as_ptr().add(at).cast()) };
                    at += ev.event_len as usize;
                    if ev.fd < 0 {
                        continue;
                    }
                    // SAFETY: the event's descriptor is ours to use and close.
                    let file = unsafe { File::from_raw_fd(ev.fd) };
                    let path =
                        std::fs::read_link(format!("/proc/self/fd/{}", ev.fd)).unwrap_or_default();
                    if path
                        .file_name()
                        .is_some_and(|f| matches(&f.to_string_lossy()))
                    {
                        act(&file);
                        acted += 1;
                    }
                    let answer = libc::fanotify_response {
                        fd: ev.fd,
                        response: libc::FAN_ALLOW,
                    };
                    // SAFETY: writing one response struct to the fanotify descriptor.
                    unsafe {
                        libc::write(
                            fan.as_raw_fd(),
                            (&answer as *const libc::fanotify_response).cast(),
                            std::mem::size_of::<libc::fanotify_response>(),
                        )
                    };
                    drop(file);
                }
            }
            acted
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops intercepting; returns how many opens of the file it acted on.
    pub fn stop(mut self) -> Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .context("stopped twice")?
            .join()
            .map_err(|_| anyhow::anyhow!("the fanotify thread panicked"))
    }
}

impl Drop for OpenInterceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
