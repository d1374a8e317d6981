//! Post-copy's page streams over the migration channel. The target's shims ask for pages on
//! a Unix socket of the target's stasisctl (one connection per container, its directory
//! named on the first line); each becomes a numbered stream in the Noise session, which the
//! source's stasisctl joins to a connection to its shim's page socket. Bytes pass unchanged
//! (the target's shim checks every answer); control messages (the target's answers) share the
//! session. One thread per side, polling its sockets: no frame is ever split between streams.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    os::{
        fd::AsFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};

use super::{Channel, Outcome, CONTROL, FRAME};

/// A stream opens (its number, then the container's directory name).
const OPEN: u8 = b'O';
/// Bytes of a stream (its number first).
const BYTES: u8 = b'B';
/// A stream ends (its number).
const SHUT: u8 = b'S';
/// The most streams one migration opens (one per container).
const MAX_STREAMS: usize = 256;
/// How long the source waits for a word from the target (its answer, pages asked for, its
/// last word) before it gives up and lets its pod run on.
const SILENCE: Duration = Duration::from_secs(120);
/// The largest piece of a stream sent in one frame (the frame also carries its number).
const PIECE: usize = FRAME - 4;

/// CRIU's page-server requests that a lazy-pages daemon sends: ask for pages, end the
/// transfer (`criu/include/page-xfer.h`; the low 16 bits name the command).
const PS_IOV_GET: u32 = 7;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
/// A request's size: command, page count, address, task (CRIU 4.1's layout, as the shim's
/// page feed reads it; docs/migration.md says why peers must run the same CRIU).
const REQUEST: usize = 24;
/// The most pages one request may ask for (CRIU's daemon asks for at most 4 MiB).
const MAX_REQUEST_PAGES: u32 = 4096;

/// What the source lets through from the target to its CRIU on one stream: whole requests
/// for pages and one end, nothing else. CRIU's page server also takes commands that write
/// images, and the peer is not trusted with them.
#[derive(Default)]
struct Requests {
    partial: Vec<u8>,
    ended: bool,
}

impl Requests {
    /// Checks a piece of the stream: an error names the first request refused.
    fn check(&mut self, piece: &[u8]) -> Result<()> {
        for b in piece {
            if self.ended {
                bail!("bytes after the end of the page transfer");
            }
            self.partial.push(*b);
            if self.partial.len() < REQUEST {
                continue;
            }
            let req: [u8; REQUEST] = std::mem::take(&mut self.partial)
                .try_into()
                .expect("a whole request");
            let cmd = u32::from_le_bytes(req[0..4].try_into()?);
            let nr = u32::from_le_bytes(req[4..8].try_into()?);
            match cmd {
                PS_IOV_GET if (1..=MAX_REQUEST_PAGES).contains(&nr) => {}
                PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => self.ended = true,
                _ => bail!("a page-server request refused (command {cmd:#x}, {nr} pages)"),
            }
        }
        Ok(())
    }
}

/// The target's last word: every page is in, or why not.
#[derive(Serialize, Deserialize, Default, Debug)]
pub struct PagesDone {
    pub ok: bool,
    pub error: Option<String>,
}

/// What the source learnt from a post-copy migration.
pub struct PostCopied {
    pub pod_id: String,
    /// When the target said its pod runs (the end of the downtime).
    pub running_at: Instant,
    pub page_bytes: u64,
    /// The connections to the source shim's page socket: held until its FinishCheckpoint
    /// returned, so that the shim does not take the transfer's end for its caller's.
    pub leases: Vec<UnixStream>,
}

fn numbered(id: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + data.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn split(data: &[u8]) -> Result<(u32, &[u8])> {
    if data.len() < 4 {
        bail!("protocol error: a stream frame without its number");
    }
    Ok((u32::from_be_bytes(data[..4].try_into()?), &data[4..]))
}

/// Which of `fds` can be read now (or have hung up); waits at most `timeout`.
fn readable(fds: &[std::os::fd::BorrowedFd<'_>], timeout: PollTimeout) -> Result<Vec<bool>> {
    let mut polls: Vec<PollFd> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    match poll(&mut polls, timeout) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Ok(vec![false; fds.len()]),
        Err(e) => return Err(e.into()),
    }
    Ok(polls
        .iter()
        .map(|p| {
            p.revents().is_some_and(|r| {
                !(r & (PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)).is_empty()
            })
        })
        .collect())
}

/// Sends what `conn` has as a piece of stream `id`: the bytes sent, None once it ended (a
/// SHUT is sent).
fn forward(
    channel: &mut Channel,
    id: u32,
    conn: &mut impl Read,
    buf: &mut [u8],
) -> Result<Option<u64>> {
    let n = match conn.read(buf) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(Some(0)),
        Err(_) => 0,
    };
    if n == 0 {
        channel.send(SHUT, &id.to_be_bytes())?;
        return Ok(None);
    }
    channel.send(BYTES, &numbered(id, &buf[..n]))?;
    Ok(Some(n as u64))
}

/// Writes a piece that came for stream `id` (a stream already ended drops it).
fn deliver<S: Write>(conns: &mut HashMap<u32, S>, id: u32, data: &[u8]) {
    if let Some(c) = conns.get_mut(&id) {
        if c.write_all(data).is_err() {
            // Its reader went away; it sees the end when it is dropped.
            conns.remove(&id);
        }
    }
}

impl Channel {
    /// The source's side, after the pod's files were sent: joins the streams the target opens
    /// to connections to the shim's `page_socket`, until the target says every page is in.
    /// The target's first answer says whether its pod runs; the page streams carry on after it.
    pub fn relay_source(&mut self, page_socket: &Path, to: &str) -> Result<PostCopied> {
        // A frame begun and never finished must not hold the pod either.
        self.stream.set_read_timeout(Some(SILENCE))?;
        let mut conns: HashMap<u32, TcpStream> = HashMap::new();
        let mut requests: HashMap<u32, Requests> = HashMap::new();
        // Held open while the transfer lasts (and, when it succeeds, by the caller until the
        // shim was told to stop the pod): the shim takes their end for its caller's.
        let mut leases: Vec<UnixStream> = Vec::new();
        let mut running: Option<(String, Instant)> = None;
        let mut buf = vec![0u8; PIECE];
        let mut page_bytes = 0u64;
        let mut heard = Instant::now();
        loop {
            let ids: Vec<u32> = conns.keys().copied().collect();
            let ready = {
                let mut fds = vec![self.stream.as_fd()];
                fds.extend(ids.iter().map(|i| conns[i].as_fd()));
                readable(&fds, PollTimeout::from(1000u16))?
            };
            // A target gone silent (a partition without a reset) must not hold the pod: the
            // hold ends here, well before the shim's own bound.
            if ready[0] {
                heard = Instant::now();
            } else if heard.elapsed() > SILENCE {
                bail!("no word from {to} for {SILENCE:?}");
            }
            for (k, id) in ids.iter().enumerate() {
                if ready[k + 1] {
                    let conn = conns.get_mut(id).expect("listed");
                    match forward(self, *id, conn, &mut buf)? {
                        Some(n) => page_bytes += n,
                        None => drop(conns.remove(id)),
                    }
                }
            }
            if !ready[0] {
                continue;
            }
            let (kind, data) = self
                .recv()
                .with_context(|| format!("the connection to {to} was lost"))?;
            match kind {
                OPEN => {
                    let (id, name) = split(&data)?;
                    if conns.len() >= MAX_STREAMS {
                        bail!("{to} opened more than {MAX_STREAMS} page streams");
                    }
                    let (server, lease) = page_server(page_socket, name)?;
                    conns.insert(id, server);
                    requests.insert(id, Requests::default());
                    leases.push(lease);
                }
                BYTES => {
                    let (id, piece) = split(&data)?;
                    if let Some(r) = requests.get_mut(&id) {
                        r.check(piece)
                            .with_context(|| format!("page stream {id} from {to}"))?;
                    }
                    deliver(&mut conns, id, piece);
                }
                SHUT => {
                    conns.remove(&split(&data)?.0);
                }
                CONTROL if running.is_none() => {
                    let answer: Outcome = serde_json::from_slice(&data)?;
                    match (answer.pod_id, answer.error) {
                        (Some(pod_id), None) => running = Some((pod_id, Instant::now())),
                        (_, e) => bail!(
                            "{to} could not restore the pod: {}",
                            e.unwrap_or_else(|| "no reason given".into())
                        ),
                    }
                }
                CONTROL => {
                    let done: PagesDone = serde_json::from_slice(&data)?;
                    let (pod_id, running_at) = running.take().expect("answered");
                    if !done.ok {
                        bail!(
                            "pod {pod_id} on {to} did not get all of its memory: {}",
                            done.error.unwrap_or_else(|| "no reason given".into())
                        );
                    }
                    return Ok(PostCopied {
                        pod_id,
                        running_at,
                        page_bytes,
                        leases,
                    });
                }
                other => bail!("protocol error: frame kind {other:#x} in a page relay"),
            }
        }
    }

    /// The target's side: serves `listener` (the shims' page requests) over the channel, and
    /// sends each message `control` gives; ends after sending a [`PagesDone`], or on the first
    /// error (every shim connection then closes, and their containers are stopped).
    pub fn relay_target(
        mut self,
        listener: UnixListener,
        control: mpsc::Receiver<Vec<u8>>,
    ) -> Result<()> {
        listener.set_nonblocking(true)?;
        let mut conns: HashMap<u32, UnixStream> = HashMap::new();
        let mut next = 0u32;
        let mut buf = vec![0u8; PIECE];
        loop {
            loop {
                match control.try_recv() {
                    Ok(message) => {
                        self.send(CONTROL, &message)?;
                        if serde_json::from_slice::<PagesDone>(&message).is_ok() {
                            return Ok(());
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    // The restore is over without a last word (it failed and said so).
                    Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            let ids: Vec<u32> = conns.keys().copied().collect();
            let ready = {
                let mut fds = vec![self.stream.as_fd(), listener.as_fd()];
                fds.extend(ids.iter().map(|i| conns[i].as_fd()));
                readable(&fds, PollTimeout::from(20u8))?
            };
            if ready[1] {
                if let Ok((mut c, _)) = listener.accept() {
                    let name = read_name(&mut c)?;
                    next += 1;
                    self.send(OPEN, &numbered(next, name.as_bytes()))?;
                    conns.insert(next, c);
                }
            }
            for (k, id) in ids.iter().enumerate() {
                if ready[k + 2] {
                    let conn = conns.get_mut(id).expect("listed");
                    if forward(&mut self, *id, conn, &mut buf)?.is_none() {
                        conns.remove(id);
                    }
                }
            }
            if ready[0] {
                let (kind, data) = self
                    .recv()
                    .context("the connection to the source was lost")?;
                match kind {
                    BYTES => {
                        let (id, piece) = split(&data)?;
                        deliver(&mut conns, id, piece);
                    }
                    SHUT => {
                        conns.remove(&split(&data)?.0);
                    }
                    other => bail!("protocol error: frame kind {other:#x} from the source"),
                }
            }
        }
    }
}

/// A connection to the CRIU page server of the container whose directory is `name`, which
/// the pod's shim passes over its `page_socket` (SCM_RIGHTS): the pages flow between CRIU
/// and us directly from then on. With it, the connection to the shim (the lease).
fn page_server(page_socket: &Path, name: &[u8]) -> Result<(TcpStream, UnixStream)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd};
    let context = || {
        format!(
            "get the page server of {} from the pod's shim at {}",
            String::from_utf8_lossy(name),
            page_socket.display()
        )
    };
    let mut c = UnixStream::connect(page_socket).with_context(context)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    c.write_all(name)?;
    c.write_all(b"\n")?;
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        c.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .with_context(context)?;
    for cmsg in msg.cmsgs().with_context(context)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
                let tcp = unsafe { TcpStream::from_raw_fd(*fd) };
                tcp.set_nonblocking(false)?;
                return Ok((tcp, c));
            }
        }
    }
    Err(anyhow::anyhow!("the shim passed no connection")).with_context(context)
}

/// A shim's first line: its container's directory name (read a byte at a time: what
/// follows it is the stream's).
fn read_name(c: &mut UnixStream) -> Result<String> {
    c.set_nonblocking(false)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut name = Vec::new();
    let mut b = [0u8; 1];
    loop {
        c.read_exact(&mut b)
            .context("a page request without its container's name")?;
        if b[0] == b'\n' {
            break;
        }
        if name.len() >= 512 {
            bail!("a page request whose container name is too long");
        }
        name.push(b[0]);
    }
    c.set_read_timeout(None)?;
    Ok(String::from_utf8(name)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(cmd: u32, nr: u32) -> Vec<u8> {
        let mut r = vec![0u8; REQUEST];
        r[0..4].copy_from_slice(&cmd.to_le_bytes());
        r[4..8].copy_from_slice(&nr.to_le_bytes());
        r[8..16].copy_from_slice(&0x7f00_0000_0000u64.to_le_bytes());
        r
    }

    #[test]
    fn requests_for_pages_pass_in_any_pieces_until_the_end() {
        let mut stream = request(PS_IOV_GET, 1);
        stream.extend(request(PS_IOV_GET, MAX_REQUEST_PAGES));
        stream.extend(request(PS_IOV_CLOSE, 0));
        for cut in [1, 5, 24, 30, stream.len()] {
            let mut r = Requests::default();
            for piece in stream.chunks(cut) {
                r.check(piece).unwrap();
            }
            assert!(r.ended);
            let e = r.check(&[0]).unwrap_err();
            assert!(e.to_string().contains("after the end"), "{e}");
        }
    }

    #[test]
    fn other_commands_and_oversized_requests_are_refused() {
        // PS_IOV_ADD_F with its flags (what writes pages into the images), PS_IOV_OPEN2,
        // a GET with flags, a GET of nothing, a GET of more than a request may ask.
        for (cmd, nr) in [
            ((1 << 16) | 6, 1),
            (9, 0),
            ((1 << 16) | PS_IOV_GET, 1),
            (PS_IOV_GET, 0),
            (PS_IOV_GET, MAX_REQUEST_PAGES + 1),
        ] {
            let mut r = Requests::default();
            let req = request(cmd, nr);
            r.check(&req[..10]).unwrap();
            let e = r.check(&req[10..]).unwrap_err();
            assert!(e.to_string().contains("refused"), "{cmd:#x}: {e}");
        }
    }
}
