//! The migration stream: how `pod migrate` on the source hands a pod's checkpoint to
//! `migrate listen` on the target (the operations themselves are in `ops::migrate`).
//!
//! The link is a Noise session (`snow`, pattern NNpsk0 over X25519, ChaCha20-Poly1305,
//! BLAKE2s): both peers prove they hold the shared key before anything is sent, and every
//! byte after that is encrypted and authenticated. The key is 32 random bytes, hex, in a 0600
//! file (`migrate keygen`).

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    archive::{self, PodOptions},
    display::human,
    seal::Opening,
};

const NOISE: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Binds the session to this protocol and its version.
const PROLOGUE: &[u8] = b"stasis pod migration v1";
/// Largest plaintext of one frame (a Noise message is at most 65535 bytes with its tag).
const FRAME: usize = 65535 - 16 - 1;
/// How long the source pod may stay frozen for the target to restore it.
pub const HOLD_SECS: u32 = 600;

/// Writes a new shared key to `output` (0600, never over an existing file).
pub fn keygen(output: &Path) -> Result<()> {
    let mut key = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut key);
    crate::files::write_new_private(output, format!("{}\n", hex::encode(key)).as_bytes())
}

/// Reads a key file, refusing one others may read.
pub fn load_key(path: &Path) -> Result<[u8; 32]> {
    let mut f = stasis_api::private::open_nofollow(path)
        .with_context(|| format!("open key file {}", path.display()))?;
    let meta = f.metadata()?;
    if meta.mode() & 0o077 != 0 || meta.uid() != nix::unistd::geteuid().as_raw() {
        bail!(
            "key file {} must be yours with mode 0600 (it is {:o}, uid {})",
            path.display(),
            meta.mode() & 0o777,
            meta.uid()
        );
    }
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| {
            format!(
                "{} is not a migration key (64 hex digits, from stasisctl migrate keygen)",
                path.display()
            )
        })
}

/// One end of an authenticated, encrypted session.
pub struct Channel {
    stream: TcpStream,
    noise: snow::TransportState,
    buf: Vec<u8>,
}

/// What a frame carries.
const DATA: u8 = b'D';
const END: u8 = b'E';
const CONTROL: u8 = b'J';

fn builder(key: &[u8; 32]) -> Result<snow::Builder<'_>> {
    Ok(snow::Builder::new(NOISE.parse()?)
        .prologue(PROLOGUE)?
        .psk(0, key)?)
}

fn write_frame(stream: &mut TcpStream, frame: &[u8]) -> std::io::Result<()> {
    stream.write_all(&(frame.len() as u16).to_be_bytes())?;
    stream.write_all(frame)
}

fn read_frame(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    buf.resize(u16::from_be_bytes(len) as usize, 0);
    stream.read_exact(buf)
}

/// How long a peer has to complete the handshake, however it spreads its bytes.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// The largest greeting an NNpsk0 initiator sends (an ephemeral key and a tag, no payload),
/// with room to spare: anything longer is not a stasis peer.
const MAX_GREETING: usize = 1024;
/// Handshakes answered at once; more connections are dropped until one ends.
pub const MAX_HANDSHAKES: usize = 8;

/// Reads one frame, all of it before `deadline` (not per read: a peer sending a byte at a
/// time cannot stretch it), refusing frames longer than `max`.
fn read_frame_by(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> std::io::Result<()> {
    let fill = |stream: &mut TcpStream, out: &mut [u8]| -> std::io::Result<()> {
        let mut got = 0;
        while got < out.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the handshake took too long",
                ));
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut out[got..]) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The read's timeout is what is left of the deadline.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the handshake took too long",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    let mut len = [0u8; 2];
    fill(stream, &mut len)?;
    let len = u16::from_be_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {len}-byte handshake message"),
        ));
    }
    buf.resize(len, 0);
    fill(stream, buf)
}

/// Connects to `to` (each address it resolves to) within the handshake deadline.
fn connect_within(to: &str) -> Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for addr in to
        .to_socket_addrs()
        .with_context(|| format!("resolve {to}"))?
    {
        match TcpStream::connect_timeout(&addr, HANDSHAKE_DEADLINE) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("no address")))
    .with_context(|| format!("connect to {to}"))
}

impl Channel {
    /// Connects and proves the key (the initiator's side).
    pub fn connect(to: &str, key: &[u8; 32]) -> Result<Channel> {
        let mut stream = connect_within(to)?;
        stream.set_nodelay(true)?;
        let mut hs = builder(key)?.build_initiator()?;
        let mut msg = vec![0u8; 65535];
        let n = hs.write_message(&[], &mut msg)?;
        write_frame(&mut stream, &msg[..n])?;
        let mut frame = Vec::new();
        read_frame_by(
            &mut stream,
            &mut frame,
            MAX_GREETING,
            Instant::now() + HANDSHAKE_DEADLINE,
        )
        .with_context(|| {
            format!("{to} closed the connection: it is not a stasis receiver, or its key differs")
        })?;
        stream.set_read_timeout(None)?;
        hs.read_message(&frame, &mut msg)
            .map_err(|_| anyhow::anyhow!("{to} does not hold the same migration key"))?;
        Ok(Channel {
            stream,
            noise: hs.into_transport_mode()?,
            buf: Vec::new(),
        })
    }

    /// Answers a connection, refusing a peer without the key (the responder's side).
    pub fn accept(mut stream: TcpStream, key: &[u8; 32]) -> Result<Channel> {
        stream.set_nodelay(true)?;
        let mut hs = builder(key)?.build_responder()?;
        let mut frame = Vec::new();
        let mut msg = vec![0u8; 65535];
        read_frame_by(
            &mut stream,
            &mut frame,
            MAX_GREETING,
            Instant::now() + HANDSHAKE_DEADLINE,
        )
        .context("read the peer's greeting")?;
        hs.read_message(&frame, &mut msg)
            .map_err(|_| anyhow::anyhow!("the peer does not hold the migration key"))?;
        let n = hs.write_message(&[], &mut msg)?;
        write_frame(&mut stream, &msg[..n])?;
        stream.set_read_timeout(Some(Duration::from_secs(600)))?;
        Ok(Channel {
            stream,
            noise: hs.into_transport_mode()?,
            buf: Vec::new(),
        })
    }

    fn send(&mut self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        let mut plain = Vec::with_capacity(data.len() + 1);
        plain.push(kind);
        plain.extend_from_slice(data);
        let mut sealed = vec![0u8; plain.len() + 16];
        let n = self
            .noise
            .write_message(&plain, &mut sealed)
            .map_err(std::io::Error::other)?;
        write_frame(&mut self.stream, &sealed[..n])
    }

    fn recv(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut frame = Vec::new();
        read_frame(&mut self.stream, &mut frame)?;
        let mut plain = vec![0u8; frame.len()];
        let n = self.noise.read_message(&frame, &mut plain).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a frame failed authentication: the stream was changed or cut",
            )
        })?;
        plain.truncate(n);
        if plain.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "empty frame",
            ));
        }
        let kind = plain.remove(0);
        Ok((kind, plain))
    }

    pub fn send_json<T: Serialize>(&mut self, value: &T) -> Result<()> {
        Ok(self.send(CONTROL, &serde_json::to_vec(value)?)?)
    }

    pub fn recv_json<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T> {
        let (kind, data) = self.recv()?;
        if kind != CONTROL {
            bail!("protocol error: expected a control message");
        }
        Ok(serde_json::from_slice(&data)?)
    }

    /// A writer of the data stream; `finish` marks its end.
    pub fn writer(&mut self) -> DataWriter<'_> {
        DataWriter {
            channel: self,
            pending: Vec::with_capacity(FRAME),
            sent: 0,
        }
    }

    /// A reader of the data stream, ending where the sender's `finish` was.
    pub fn reader(&mut self) -> DataReader<'_> {
        DataReader {
            channel: self,
            at: 0,
            ended: false,
            received: 0,
        }
    }
}

pub struct DataWriter<'a> {
    channel: &'a mut Channel,
    pending: Vec<u8>,
    sent: u64,
}

impl Write for DataWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(FRAME - self.pending.len());
        self.pending.extend_from_slice(&buf[..n]);
        if self.pending.len() == FRAME {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            self.channel.send(DATA, &self.pending)?;
            self.sent += self.pending.len() as u64;
            self.pending.clear();
        }
        Ok(())
    }
}

impl DataWriter<'_> {
    pub fn finish(mut self) -> std::io::Result<u64> {
        self.flush()?;
        self.channel.send(END, &[])?;
        Ok(self.sent)
    }
}

pub struct DataReader<'a> {
    channel: &'a mut Channel,
    at: usize,
    ended: bool,
    received: u64,
}

impl Read for DataReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.channel.buf.len() {
            if self.ended {
                return Ok(0);
            }
            let (kind, data) = self.channel.recv()?;
            match kind {
                DATA => {
                    self.received += data.len() as u64;
                    crate::progress::count(data.len() as u64);
                    self.channel.buf = data;
                    self.at = 0;
                }
                END => self.ended = true,
                // The sender gave up half-way (its error follows as a control message).
                CONTROL => {
                    let e: Outcome = serde_json::from_slice(&data).unwrap_or_default();
                    return Err(std::io::Error::other(format!(
                        "the source gave up: {}",
                        e.error.unwrap_or_default()
                    )));
                }
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "protocol error: unknown frame",
                    ))
                }
            }
        }
        let n = out.len().min(self.channel.buf.len() - self.at);
        out[..n].copy_from_slice(&self.channel.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The source's first message.
#[derive(Serialize, Deserialize, Default)]
pub struct Offer {
    pub pod: String,
    pub name: Option<String>,
    pub runtime_handler: Option<String>,
    /// Restore lazily on the target: its containers run before their memory is mapped.
    #[serde(default)]
    pub lazy: bool,
    /// Post-copy: the pages stay on the source (CRIU serves them from the frozen pod) and
    /// cross through page streams in this session once the target's pod runs.
    #[serde(default)]
    pub post_copy: bool,
}

/// The target's answer once it has restored (or failed to).
#[derive(Serialize, Deserialize, Default)]
pub struct Outcome {
    pub pod_id: Option<String>,
    pub error: Option<String>,
    pub restore_ms: f64,
}

/// What the target answered once it restored a pod sent to it.
pub struct Sent {
    pub bytes: u64,
    pub pod_id: String,
}

impl Channel {
    /// Sends the staged checkpoint `dir` as a tar and waits for the target's answer (`to`
    /// names the peer in messages). The pod stays frozen (held by its shim) until this answer:
    /// the wait is a little shorter than the hold, so a silent target ends in a thawed source,
    /// not a stopped one.
    pub fn send_pod(&mut self, dir: &Path, to: &str) -> Result<Sent> {
        let bytes = self.send_pod_files(dir, to)?;
        self.stream
            .set_read_timeout(Some(Duration::from_secs(HOLD_SECS as u64 - 30)))?;
        let answer: Outcome = self
            .recv_json()
            .with_context(|| format!("no answer from {to}"))?;
        match (answer.pod_id, answer.error) {
            (Some(pod_id), None) => Ok(Sent { bytes, pod_id }),
            (_, e) => bail!(
                "{to} could not restore the pod: {}",
                e.unwrap_or_else(|| "no reason given".into())
            ),
        }
    }

    /// Sends the staged checkpoint `dir` as a tar; returns the bytes sent.
    pub fn send_pod_files(&mut self, dir: &Path, to: &str) -> Result<u64> {
        (|| -> Result<u64> {
            let mut w = self.writer();
            archive::write_tar(dir, &mut w)?;
            Ok(w.finish()?)
        })()
        .with_context(|| format!("send the pod to {to} (the connection was lost)"))
    }

    /// Receives a pod's checkpoint into the fresh directory `dir`, checked as an archive is
    /// (`opening` says whose signature it needs).
    pub fn receive_pod(&mut self, dir: &Path, opening: &Opening, peer: &str) -> Result<PodOptions> {
        let mut r = self.reader();
        let options = archive::extract_stream(&mut r, dir, opening)?;
        // The tar ends before the stream does: read to the sender's end mark, so that a
        // stream cut short is an error, not a restore.
        std::io::copy(&mut r, &mut std::io::sink())?;
        if !r.ended {
            bail!("the stream from {peer} ended early");
        }
        eprintln!("received {} from {peer}", human(r.received));
        Ok(options)
    }
}

mod relay;
pub use relay::{PagesDone, PostCopied};

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::TcpListener, thread};

    const KEY: [u8; 32] = [7; 32];

    /// What the sender sends: an offer, then `len` bytes of data and its end mark.
    fn send_all(to: String, key: [u8; 32], len: usize) -> thread::JoinHandle<Result<u64>> {
        thread::spawn(move || {
            let mut c = Channel::connect(&to, &key)?;
            c.send_json(&Offer {
                pod: "web".into(),
                ..Default::default()
            })?;
            let mut w = c.writer();
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            w.write_all(&data)?;
            Ok(w.finish()?)
        })
    }

    /// What the receiver got: the offer's pod, the data, whether the end mark came.
    fn receive_all(listener: &TcpListener, key: [u8; 32]) -> Result<(String, Vec<u8>, bool)> {
        let (stream, _) = listener.accept()?;
        let mut c = Channel::accept(stream, &key)?;
        let offer: Offer = c.recv_json()?;
        let mut r = c.reader();
        let mut data = Vec::new();
        r.read_to_end(&mut data)?;
        Ok((offer.pod, data, r.ended))
    }

    fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    #[test]
    fn a_stream_arrives_whole_and_ends_with_its_mark() {
        let (l, addr) = listener();
        let sender = send_all(addr, KEY, 300_000);
        let (pod, data, ended) = receive_all(&l, KEY).unwrap();
        assert_eq!(sender.join().unwrap().unwrap(), 300_000);
        assert_eq!((pod.as_str(), data.len(), ended), ("web", 300_000, true));
        assert!(data.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    }

    #[test]
    fn peers_without_the_same_key_learn_nothing() {
        let (l, addr) = listener();
        let sender = send_all(addr, [8; 32], 10);
        let got = receive_all(&l, KEY);
        assert!(got.is_err());
        let e = sender.join().unwrap().unwrap_err();
        assert!(format!("{e:#}").contains("key"), "{e:#}");
    }

    /// Forwards the sender's first `frames` frames (handshake included) to `to`, then cuts
    /// the connection; the receiver's answers go back whole.
    fn cutting_proxy(frames: usize, to: String) -> (String, thread::JoinHandle<usize>) {
        let (l, addr) = listener();
        let h = thread::spawn(move || {
            let (mut from, _) = l.accept().unwrap();
            let mut out = TcpStream::connect(&to).unwrap();
            let mut back = out.try_clone().unwrap();
            let mut reply = from.try_clone().unwrap();
            thread::spawn(move || std::io::copy(&mut back, &mut reply));
            let mut sent = 0;
            while sent < frames {
                let mut len = [0u8; 2];
                if from.read_exact(&mut len).is_err() {
                    break;
                }
                let mut frame = vec![0u8; u16::from_be_bytes(len) as usize];
                if from.read_exact(&mut frame).is_err() {
                    break;
                }
                out.write_all(&len).unwrap();
                out.write_all(&frame).unwrap();
                sent += 1;
            }
            let _ = out.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
            sent
        });
        (addr, h)
    }

    #[test]
    fn a_stream_cut_at_any_frame_is_an_error_never_a_short_pod() {
        // Handshake (1 frame from the sender), the offer, 3 data frames, the end mark: 6.
        let len = 2 * FRAME + 100;
        for frames in 1..=6 {
            let (l, addr) = listener();
            let (proxy, cut) = cutting_proxy(frames, addr);
            let sender = send_all(proxy, KEY, len);
            let got = receive_all(&l, KEY);
            let forwarded = cut.join().unwrap();
            let _ = sender.join();
            match (frames, got) {
                (6, Ok((_, data, ended))) => assert!(ended && data.len() == len),
                (_, Ok((_, data, ended))) => {
                    assert!(
                        !ended,
                        "cut after {frames} frames ({forwarded} sent) read as whole"
                    );
                    assert!(data.len() < len);
                }
                (6, Err(e)) => panic!("the whole stream failed: {e:#}"),
                (_, Err(_)) => {}
            }
        }
    }
}
