//! CRIU's image files, read with bounds. An image is a little-endian magic (two for all but
//! the inventory: CRIU's common magic, then the image's own), then length-prefixed protobuf
//! entries (`criu/image.c`); raw images (pages, tar archives of tmpfs) have no magic. Only
//! the messages the restore checks read are described here, with CRIU's field numbers
//! (`images/*.proto`); prost skips the fields it is not told about.

use std::io::Read;

use prost::Message;

/// A failure to read an image: what and where, for the caller to name the container.
pub type ReadResult<T> = std::result::Result<T, String>;

pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
pub const INVENTORY_MAGIC: u32 = 0x5831_3116;

/// The largest image file parsed whole, and the largest entry in it: far above what a
/// container's images hold (a core image is a few KiB), far below what hurts.
pub const MAX_IMAGE: u64 = 64 << 20;
pub const MAX_ENTRY: u32 = 16 << 20;

/// What a file of a CRIU image directory may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A protobuf image with this magic (the inventory has no common magic before it).
    Proto(u32),
    /// Raw bytes (page contents, CRIU's tar of a tmpfs, network tables).
    Raw,
}

/// Image names CRIU writes (`criu/image-desc.c`), by prefix and suffix, with their magics
/// (`criu/include/magic.h`). `refused` names what a container restore never accepts: state
/// that reaches outside the container (namespaces' files, external files, network devices
/// and tables of a namespace the container does not own, user namespaces, LSM policy,
/// binfmt handlers, BPF maps, tun devices, fanotify).
pub struct ImageType {
    pub prefix: &'static str,
    pub numbered: bool,
    pub suffix: &'static str,
    pub kind: Kind,
    pub refused: Option<&'static str>,
}

const fn proto(prefix: &'static str, numbered: bool, magic: u32) -> ImageType {
    ImageType {
        prefix,
        numbered,
        suffix: ".img",
        kind: Kind::Proto(magic),
        refused: None,
    }
}

const fn raw(prefix: &'static str, numbered: bool, suffix: &'static str) -> ImageType {
    ImageType {
        prefix,
        numbered,
        suffix,
        kind: Kind::Raw,
        refused: None,
    }
}

const fn refused(prefix: &'static str, numbered: bool, why: &'static str) -> ImageType {
    ImageType {
        prefix,
        numbered,
        suffix: ".img",
        kind: Kind::Raw,
        refused: Some(why),
    }
}

pub const CORE_MAGIC: u32 = 0x5505_3847;
pub const MNTS_MAGIC: u32 = 0x5556_3928;
pub const SECCOMP_MAGIC: u32 = 0x6441_3049;
pub const REG_FILES_MAGIC: u32 = 0x5036_3636;
pub const FILES_MAGIC: u32 = 0x5630_3138;
pub const FDINFO_MAGIC: u32 = 0x5621_3732;
pub const PSTREE_MAGIC: u32 = 0x5027_3030;
pub const IDS_MAGIC: u32 = 0x5443_2030;
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;
pub const NETNS_MAGIC: u32 = 0x5593_3752;
pub const PIDNS_MAGIC: u32 = 0x6115_7326;

/// Longest prefixes first, so that `pagemap-shmem-` is not taken for `pagemap-`.
pub const TYPES: &[ImageType] = &[
    proto("inventory", false, INVENTORY_MAGIC),
    proto("fdinfo-", true, FDINFO_MAGIC),
    proto("pagemap-shmem-", true, PAGEMAP_MAGIC),
    proto("pagemap-", true, PAGEMAP_MAGIC),
    proto("reg-files", false, REG_FILES_MAGIC),
    proto("eventfd", false, 0x4452_3722),
    proto("eventpoll-tfd", false, 0x4443_3746),
    proto("eventpoll", false, 0x4502_3858),
    proto("signalfd", false, 0x5732_3820),
    proto("inotify-wd", false, 0x5456_2009),
    proto("inotify", false, 0x4842_4431),
    proto("core-", true, CORE_MAGIC),
    proto("ids-", true, IDS_MAGIC),
    proto("mm-", true, 0x5749_2820),
    proto("vmas-", true, 0x5412_3737),
    proto("pipes-data", false, 0x5645_3709),
    proto("pipes", false, 0x5651_3555),
    proto("fifo-data", false, 0x5933_3054),
    proto("fifo", false, 0x5836_4939),
    proto("pstree", false, PSTREE_MAGIC),
    proto("sigacts-", true, 0x5534_4201),
    proto("unixsk", false, 0x5437_3943),
    proto("inetsk", false, 0x5644_3851),
    proto("packetsk", false, 0x6045_4618),
    proto("netlinksk", false, 0x5800_5614),
    proto("sk-queues", false, 0x5626_4026),
    proto("itimers-", true, 0x5746_4056),
    proto("posix-timers-", true, 0x5260_3957),
    proto("creds-", true, 0x5402_3547),
    proto("utsns-", true, 0x5447_3203),
    proto("ipcns-var-", true, 0x5311_5007),
    proto("ipcns-shm-", true, 0x4628_3044),
    proto("ipcns-msg-", true, 0x5545_3737),
    proto("ipcns-sem-", true, 0x5957_3019),
    proto("fs-", true, 0x5140_3912),
    proto("remap-fpath", false, 0x5913_3954),
    proto("ghost-file-", true, 0x5258_3605),
    proto("memfd", false, 0x4845_3499),
    proto("tcp-stream-", true, 0x5146_5506),
    proto("mountpoints-", true, MNTS_MAGIC),
    proto("tty-info", false, 0x5945_3036),
    proto("tty-data", false, 0x5941_3026),
    proto("tty", false, 0x5943_3025),
    proto("filelocks", false, 0x5432_3616),
    proto("rlimit-", true, 0x5711_3925),
    proto("signal-s-", true, 0x5925_5647),
    proto("signal-p-", true, 0x5925_5647),
    proto("cgroup", false, 0x5938_3330),
    proto("timerfd", false, 0x5049_3712),
    proto("cpuinfo", false, 0x6140_4013),
    proto("seccomp", false, SECCOMP_MAGIC),
    proto("files", false, FILES_MAGIC),
    proto("timens-", true, 0x4311_4433),
    proto("pidfd", false, 0x5443_5556),
    raw("pages-", true, ".img"),
    raw("tmpfs-dev-", true, ".tar.gz.img"),
    raw("tmpfs-", true, ".tar.gz.img"),
    refused(
        "ext-files",
        false,
        "files CRIU takes from outside the container",
    ),
    refused("ns-files", false, "open namespace files"),
    refused("fanotify", false, "fanotify marks"),
    refused("tunfile", false, "tun devices"),
    refused("netdev-", true, "network devices"),
    proto("netns-", true, NETNS_MAGIC),
    refused("ifaddr-", true, "network addresses"),
    refused("route6-", true, "routes"),
    refused("route-", true, "routes"),
    refused("rule-", true, "routing rules"),
    refused("iptables-", true, "iptables rules"),
    refused("ip6tables-", true, "ip6tables rules"),
    refused("nftables-", true, "nftables rules"),
    refused("userns-", true, "a user namespace"),
    proto("pidns-", true, PIDNS_MAGIC),
    refused("binfmt-misc", false, "binfmt_misc handlers"),
    refused("autofs-", true, "autofs mounts"),
    refused("bpfmap-", false, "BPF maps"),
    refused("apparmor", false, "AppArmor policy to load into the kernel"),
];

/// The type of an image file by its name, or None for a name CRIU never writes.
pub fn image_type(name: &str) -> Option<&'static ImageType> {
    TYPES.iter().find(|t| {
        let Some(rest) = name.strip_prefix(t.prefix) else {
            return false;
        };
        let Some(middle) = rest.strip_suffix(t.suffix) else {
            return false;
        };
        if t.prefix == "bpfmap-" {
            return matches!(middle, "file" | "data");
        }
        if t.numbered {
            // CRIU writes decimal ids, ghost files and TCP streams hexadecimal ones.
            !middle.is_empty()
                && middle.len() <= 20
                && middle.bytes().all(|b| b.is_ascii_hexdigit())
        } else {
            middle.is_empty()
        }
    })
}

fn word(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The protobuf entries of a whole image, after its magics. Images whose entries carry raw
/// payloads after them (pipe and socket queues, ghost files) are not parsed here.
pub fn entries(bytes: &[u8], magic: u32) -> ReadResult<Vec<&[u8]>> {
    let mut at = if magic == INVENTORY_MAGIC {
        if word(bytes, 0) != Some(magic) {
            return Err("not an inventory image (wrong magic)".into());
        }
        4
    } else {
        let head = word(bytes, 0);
        if head != Some(IMG_COMMON_MAGIC) && head != Some(IMG_SERVICE_MAGIC) {
            return Err("not a CRIU image (wrong magic)".into());
        }
        if word(bytes, 4) != Some(magic) {
            return Err(format!(
                "its magic {:#x} is not the one of its name ({magic:#x})",
                word(bytes, 4).unwrap_or(0)
            ));
        }
        8
    };
    let mut out = Vec::new();
    while at < bytes.len() {
        let len = word(bytes, at).ok_or("a truncated entry length")?;
        if len > MAX_ENTRY {
            return Err(format!("an entry of {len} bytes (at most {MAX_ENTRY})"));
        }
        let body = bytes
            .get(at + 4..at + 4 + len as usize)
            .ok_or_else(|| format!("an entry of {len} bytes runs past the end"))?;
        out.push(body);
        at += 4 + len as usize;
    }
    Ok(out)
}

/// The magic an image file starts with (after the common one), read from its head only.
pub fn head_magic(r: &mut impl Read) -> ReadResult<u32> {
    let mut b = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match r.read(&mut b[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    match (word(&b[..got], 0), word(&b[..got], 4)) {
        (Some(INVENTORY_MAGIC), _) => Ok(INVENTORY_MAGIC),
        (Some(IMG_COMMON_MAGIC | IMG_SERVICE_MAGIC), Some(m)) => Ok(m),
        _ => Err("not a CRIU image (wrong magic)".into()),
    }
}

/// Decodes every entry of an image as `M`.
pub fn decode_all<M: Message + Default>(bytes: &[u8], magic: u32) -> ReadResult<Vec<M>> {
    entries(bytes, magic)?
        .into_iter()
        .enumerate()
        .map(|(i, e)| M::decode(e).map_err(|err| format!("entry {i}: {err}")))
        .collect()
}

/// `creds_entry` (images/creds.proto).
#[derive(Clone, PartialEq, Message)]
pub struct CredsEntry {
    #[prost(uint32, required, tag = "1")]
    pub uid: u32,
    #[prost(uint32, required, tag = "2")]
    pub gid: u32,
    #[prost(uint32, required, tag = "3")]
    pub euid: u32,
    #[prost(uint32, required, tag = "4")]
    pub egid: u32,
    #[prost(uint32, required, tag = "5")]
    pub suid: u32,
    #[prost(uint32, required, tag = "6")]
    pub sgid: u32,
    #[prost(uint32, required, tag = "7")]
    pub fsuid: u32,
    #[prost(uint32, required, tag = "8")]
    pub fsgid: u32,
    #[prost(uint32, repeated, packed = "false", tag = "9")]
    pub cap_inh: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "10")]
    pub cap_prm: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "11")]
    pub cap_eff: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "12")]
    pub cap_bnd: Vec<u32>,
    #[prost(uint32, required, tag = "13")]
    pub secbits: u32,
    #[prost(uint32, repeated, packed = "false", tag = "14")]
    pub groups: Vec<u32>,
    #[prost(string, optional, tag = "15")]
    pub lsm_profile: Option<String>,
    #[prost(string, optional, tag = "16")]
    pub lsm_sockcreate: Option<String>,
    #[prost(bytes = "vec", optional, tag = "17")]
    pub apparmor_data: Option<Vec<u8>>,
    #[prost(uint32, optional, tag = "18")]
    pub no_new_privs: Option<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "19")]
    pub cap_amb: Vec<u32>,
}

/// The parts of `thread_core_entry` (images/core.proto) a restore checks.
#[derive(Clone, PartialEq, Message)]
pub struct ThreadCoreEntry {
    #[prost(message, optional, tag = "10")]
    pub creds: Option<CredsEntry>,
    #[prost(uint32, optional, tag = "11")]
    pub seccomp_mode: Option<u32>,
    #[prost(uint32, optional, tag = "12")]
    pub seccomp_filter: Option<u32>,
}

/// The parts of `task_core_entry`: the deprecated per-task seccomp fields CRIU still honours.
#[derive(Clone, PartialEq, Message)]
pub struct TaskCoreEntry {
    #[prost(uint32, required, tag = "1")]
    pub task_state: u32,
    #[prost(string, required, tag = "6")]
    pub comm: String,
    #[prost(uint32, optional, tag = "11")]
    pub old_seccomp_mode: Option<u32>,
    #[prost(uint32, optional, tag = "12")]
    pub old_seccomp_filter: Option<u32>,
}

/// `task_state` values CRIU writes (criu/include/pid.h): a dead task (a zombie) and a
/// helper run none of the images' code.
pub const TASK_DEAD: u32 = 0x2;
/// A task that was stopped (SIGSTOP) when it was dumped: CRIU restores it stopped.
pub const TASK_STOPPED: u32 = 0x3;
pub const TASK_ZOMBIE: u32 = 0x6;
pub const TASK_HELPER: u32 = 0x80;

/// `task_kobj_ids_entry`: which namespaces (and shared objects) a task is in.
#[derive(Clone, PartialEq, Message)]
pub struct TaskKobjIdsEntry {
    #[prost(uint32, optional, tag = "5")]
    pub pid_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "6")]
    pub net_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "7")]
    pub ipc_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "8")]
    pub uts_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "9")]
    pub mnt_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "10")]
    pub user_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "11")]
    pub cgroup_ns_id: Option<u32>,
    #[prost(uint32, optional, tag = "12")]
    pub time_ns_id: Option<u32>,
}

/// `core_entry`.
#[derive(Clone, PartialEq, Message)]
pub struct CoreEntry {
    #[prost(uint32, required, tag = "1")]
    pub mtype: u32,
    #[prost(message, optional, tag = "3")]
    pub tc: Option<TaskCoreEntry>,
    #[prost(message, optional, tag = "4")]
    pub ids: Option<TaskKobjIdsEntry>,
    #[prost(message, optional, tag = "5")]
    pub thread_core: Option<ThreadCoreEntry>,
}

/// `inventory_entry` (images/inventory.proto).
#[derive(Clone, PartialEq, Message)]
pub struct InventoryEntry {
    #[prost(uint32, required, tag = "1")]
    pub img_version: u32,
    #[prost(message, optional, tag = "3")]
    pub root_ids: Option<TaskKobjIdsEntry>,
    #[prost(uint32, optional, tag = "6")]
    pub lsmtype: Option<u32>,
}

/// `pstree_entry` (images/pstree.proto).
#[derive(Clone, PartialEq, Message)]
pub struct PstreeEntry {
    #[prost(uint32, required, tag = "1")]
    pub pid: u32,
    #[prost(uint32, required, tag = "2")]
    pub ppid: u32,
    #[prost(uint32, repeated, packed = "false", tag = "5")]
    pub threads: Vec<u32>,
}

/// `seccomp_filter` and `seccomp_entry` (images/seccomp.proto): BPF programs, each naming
/// the one installed before it (`prev`, 1-based; 0 for none).
#[derive(Clone, PartialEq, Message)]
pub struct SeccompFilter {
    #[prost(bytes = "vec", required, tag = "1")]
    pub filter: Vec<u8>,
    #[prost(uint32, optional, tag = "2")]
    pub prev: Option<u32>,
    #[prost(uint32, optional, tag = "3")]
    pub flags: Option<u32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SeccompEntry {
    #[prost(message, repeated, tag = "1")]
    pub seccomp_filters: Vec<SeccompFilter>,
}

/// `netns_entry` (images/netdev.proto): a namespace with `ext_key` is the pod's, passed in
/// by the runtime, and CRIU restores nothing into it.
#[derive(Clone, PartialEq, Message)]
pub struct NetnsEntry {
    #[prost(string, optional, tag = "8")]
    pub ext_key: Option<String>,
}

/// `pidns_entry` (images/pidns.proto).
#[derive(Clone, PartialEq, Message)]
pub struct PidnsEntry {
    #[prost(string, optional, tag = "1")]
    pub ext_key: Option<String>,
}

/// `mnt_entry` (images/mnt.proto).
#[derive(Clone, PartialEq, Message)]
pub struct MntEntry {
    #[prost(uint32, required, tag = "1")]
    pub fstype: u32,
    #[prost(uint32, required, tag = "2")]
    pub mnt_id: u32,
    #[prost(uint32, required, tag = "3")]
    pub root_dev: u32,
    #[prost(uint32, required, tag = "4")]
    pub parent_mnt_id: u32,
    #[prost(uint32, required, tag = "5")]
    pub flags: u32,
    #[prost(string, required, tag = "6")]
    pub root: String,
    #[prost(string, required, tag = "7")]
    pub mountpoint: String,
    #[prost(string, required, tag = "8")]
    pub source: String,
    #[prost(string, required, tag = "9")]
    pub options: String,
    #[prost(bool, optional, tag = "13")]
    pub ext_mount: Option<bool>,
    #[prost(string, optional, tag = "14")]
    pub fsname: Option<String>,
    #[prost(uint32, optional, tag = "17")]
    pub sb_flags: Option<u32>,
    #[prost(string, optional, tag = "18")]
    pub ext_key: Option<String>,
}

/// `fstype` of images/mnt.proto.
pub mod fstype {
    pub const UNSUPPORTED: u32 = 0;
    pub const PROC: u32 = 1;
    pub const SYSFS: u32 = 2;
    pub const DEVTMPFS: u32 = 3;
    pub const TMPFS: u32 = 5;
    pub const DEVPTS: u32 = 6;
    pub const CGROUP: u32 = 12;
    pub const MQUEUE: u32 = 14;
    pub const AUTO: u32 = 16;
    pub const OVERLAYFS: u32 = 17;
    pub const CGROUP2: u32 = 23;
}

/// `reg_file_entry` (images/regfile.proto).
#[derive(Clone, PartialEq, Message)]
pub struct RegFileEntry {
    #[prost(uint32, required, tag = "1")]
    pub id: u32,
    #[prost(uint32, required, tag = "2")]
    pub flags: u32,
    #[prost(string, required, tag = "6")]
    pub name: String,
    #[prost(sint32, optional, tag = "7")]
    pub mnt_id: Option<i32>,
    #[prost(bool, optional, tag = "9")]
    pub ext: Option<bool>,
}

/// `file_entry` (images/fdinfo.proto): one open file of the `files` image.
#[derive(Clone, PartialEq, Message)]
pub struct FileEntry {
    #[prost(uint32, required, tag = "1")]
    pub r#type: u32,
    #[prost(uint32, required, tag = "2")]
    pub id: u32,
    #[prost(message, optional, tag = "3")]
    pub reg: Option<RegFileEntry>,
}

/// `fd_types` of images/fdinfo.proto.
pub mod fd_type {
    pub const REG: u32 = 1;
    pub const PIPE: u32 = 2;
    pub const FIFO: u32 = 3;
    pub const INETSK: u32 = 4;
    pub const UNIXSK: u32 = 5;
    pub const EVENTFD: u32 = 6;
    pub const EVENTPOLL: u32 = 7;
    pub const INOTIFY: u32 = 8;
    pub const SIGNALFD: u32 = 9;
    pub const PACKETSK: u32 = 10;
    pub const TTY: u32 = 11;
    pub const FANOTIFY: u32 = 12;
    pub const NETLINKSK: u32 = 13;
    pub const NS: u32 = 14;
    pub const TUNF: u32 = 15;
    pub const EXT: u32 = 16;
    pub const TIMERFD: u32 = 17;
    pub const MEMFD: u32 = 18;
    pub const BPFMAP: u32 = 19;
    pub const PIDFD: u32 = 20;
}

/// A 64-bit capability mask from CRIU's 32-bit words.
pub fn cap_mask(words: &[u32]) -> u64 {
    words
        .iter()
        .take(2)
        .enumerate()
        .fold(0, |m, (i, w)| m | (u64::from(*w) << (32 * i)))
        // Words past the second would be capabilities the kernel does not have: any bit
        // there is "more" than a spec can give.
        | if words.iter().skip(2).any(|w| *w != 0) { u64::MAX << 63 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_typed_by_crius_own_patterns() {
        for (name, want) in [
            ("core-1.img", Some(Kind::Proto(CORE_MAGIC))),
            ("pagemap-shmem-12.img", Some(Kind::Proto(PAGEMAP_MAGIC))),
            ("pages-3.img", Some(Kind::Raw)),
            ("tmpfs-dev-81.tar.gz.img", Some(Kind::Raw)),
            ("inventory.img", Some(Kind::Proto(INVENTORY_MAGIC))),
            ("core-.img", None),
            ("core-1.img.bak", None),
            ("evil.img", None),
            ("files.img", Some(Kind::Proto(FILES_MAGIC))),
        ] {
            assert_eq!(image_type(name).map(|t| t.kind), want, "{name}");
        }
        assert!(image_type("userns-11.img").unwrap().refused.is_some());
        assert!(image_type("apparmor.img").unwrap().refused.is_some());
    }

    #[test]
    fn entries_are_bounded_and_magics_checked() {
        let mut img = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
        img.extend(CORE_MAGIC.to_le_bytes());
        let core = CoreEntry {
            mtype: 1,
            ..Default::default()
        }
        .encode_to_vec();
        img.extend((core.len() as u32).to_le_bytes());
        img.extend(&core);
        let cores: Vec<CoreEntry> = decode_all(&img, CORE_MAGIC).unwrap();
        assert_eq!(cores[0].mtype, 1);
        assert!(entries(&img, MNTS_MAGIC).unwrap_err().contains("magic"));
        let mut long = img.clone();
        long.extend(u32::MAX.to_le_bytes());
        assert!(entries(&long, CORE_MAGIC).unwrap_err().contains("at most"));
        let mut short = img.clone();
        short.extend(100u32.to_le_bytes());
        assert!(entries(&short, CORE_MAGIC)
            .unwrap_err()
            .contains("past the end"));
        assert_eq!(cap_mask(&[0xffff_ffff, 1]), 0x1_ffff_ffff);
        assert_eq!(cap_mask(&[0, 0, 1]) >> 63, 1);
    }
}
