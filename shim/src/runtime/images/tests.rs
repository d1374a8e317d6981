use super::*;
use mounts::Node;

fn expected() -> Expected {
    Expected {
        bounds: Bounds {
            bounding: 0xa804_25fb,
            no_new_privs: true,
            seccomp: false,
            uid: 1000,
            gid: 1000,
        },
        groups: vec![10],
        lsm: None,
        mounts: vec![
            ("/proc".into(), "proc".into(), false),
            ("/dev".into(), "tmpfs".into(), false),
            ("/sys".into(), "sysfs".into(), true),
            ("/sys/fs/cgroup".into(), "cgroup".into(), true),
            ("/etc/hosts".into(), "bind".into(), false),
        ],
        masked: vec!["/proc/kcore".into(), "/proc/acpi".into()],
        readonly: vec!["/proc/sys".into()],
        devices: vec![],
        seccomp: None,
    }
}

fn mnt(id: u32, parent: u32, fs: u32, at: &str, ro: bool, ext: Option<&str>) -> img::MntEntry {
    img::MntEntry {
        fstype: fs,
        mnt_id: id,
        parent_mnt_id: parent,
        flags: if ro { MS_RDONLY } else { 0 },
        mountpoint: at.into(),
        ext_key: ext.map(str::to_string),
        ..Default::default()
    }
}

struct AllExist;
impl Node for AllExist {
    fn exists(&self, _: &str) -> bool {
        true
    }
}

fn honest() -> Vec<img::MntEntry> {
    vec![
        mnt(1, 0, fstype::OVERLAYFS, "/", false, None),
        mnt(2, 1, fstype::PROC, "/proc", false, None),
        mnt(3, 1, fstype::TMPFS, "/dev", false, None),
        mnt(4, 1, fstype::SYSFS, "/sys", true, None),
        mnt(5, 4, fstype::TMPFS, "/sys/fs/cgroup", true, None),
        mnt(
            6,
            5,
            fstype::CGROUP,
            "/sys/fs/cgroup/cpu",
            true,
            Some("/sys/fs/cgroup/cpu"),
        ),
        mnt(7, 1, 0, "/etc/hosts", false, Some("/etc/hosts")),
        mnt(8, 2, 0, "/proc/kcore", false, Some("/dev/null")),
        mnt(9, 2, fstype::TMPFS, "/proc/acpi", true, None),
        mnt(10, 2, fstype::PROC, "/proc/sys", true, None),
    ]
}

#[test]
fn the_spec_mounts_pass_and_every_other_is_named() {
    assert_eq!(
        mounts_excess(&honest(), &expected(), &AllExist),
        Vec::<String>::new()
    );
    let mut extra = honest();
    extra.push(mnt(11, 1, fstype::PROC, "/host-proc", false, None));
    extra.push(mnt(12, 1, fstype::DEVTMPFS, "/dev/host", false, None));
    extra.push(mnt(13, 1, 0, "/x", false, Some("/etc/shadow")));
    extra.push(mnt(14, 1, 0, "/y", false, Some("/dev/null")));
    extra[9].flags = 0; // /proc/sys writable
    extra.remove(7); // /proc/kcore unmasked
    let all = mounts_excess(&extra, &expected(), &AllExist).join("; ");
    for want in [
        "a proc mount at /host-proc",
        "a devtmpfs mount at /dev/host",
        "an external mount /etc/shadow at /x",
        "an external mount /dev/null at /y",
        "/proc/sys writable",
        "/proc/kcore is neither masked nor read-only",
    ] {
        assert!(all.contains(want), "{want}: {all}");
    }
}

#[test]
fn files_stay_on_the_containers_mounts() {
    let mounts: HashSet<i32> = [1, 2].into();
    let reg = |name: &str, mnt: i32| img::FileEntry {
        r#type: fd_type::REG,
        id: 1,
        reg: Some(img::RegFileEntry {
            name: name.into(),
            mnt_id: Some(mnt),
            ..Default::default()
        }),
    };
    assert_eq!(file_excess(&reg("/bin/sh", 1), &expected(), &mounts), None);
    assert!(file_excess(&reg("/etc/shadow", 99), &expected(), &mounts)
        .unwrap()
        .contains("not one of the container's"));
    assert!(
        file_excess(&reg("/../../etc/shadow", 1), &expected(), &mounts)
            .unwrap()
            .contains("leaving")
    );
    let ns = img::FileEntry {
        r#type: fd_type::NS,
        id: 2,
        reg: None,
    };
    assert!(file_excess(&ns, &expected(), &mounts).is_some());
}

#[test]
fn credentials_beyond_the_spec_are_named() {
    let creds = |caps: u32, uid: u32, nnp: u32| img::CredsEntry {
        uid,
        euid: uid,
        suid: uid,
        fsuid: uid,
        gid: 1000,
        egid: 1000,
        sgid: 1000,
        fsgid: 1000,
        cap_prm: vec![caps, 0],
        cap_eff: vec![caps, 0],
        cap_bnd: vec![caps, 0],
        no_new_privs: Some(nnp),
        ..Default::default()
    };
    let core = |c: img::CredsEntry| img::CoreEntry {
        mtype: 1,
        thread_core: Some(img::ThreadCoreEntry {
            creds: Some(c),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut v = HashMap::new();
    assert!(core_excess(&core(creds(0xa804_25fb, 1000, 1)), &expected(), &[], &mut v).is_empty());
    let mut fixed = expected();
    fixed.bounds.bounding &=
        !(super::super::restored::CAP_SETUID | super::super::restored::CAP_SETGID);
    let all = core_excess(&core(creds(0xffff_ffff, 0, 0)), &fixed, &[], &mut v).join("; ");
    for want in ["CAP_SYS_ADMIN", "no_new_privs off", "uids [0, 0, 0, 0]"] {
        assert!(all.contains(want), "{want}: {all}");
    }
}

#[test]
fn a_restored_mount_table_is_judged_like_the_images() {
    let table = "\
77 52 0:43 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
78 77 0:45 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
79 77 0:46 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
82 77 0:48 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
83 82 0:49 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,mode=755
84 83 0:29 /stasis/p/c /sys/fs/cgroup/cpu ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu
93 77 254:0 /tmp/x/hosts /etc/hosts rw,relatime - ext4 /dev/vda rw
94 78 0:5 /null /proc/kcore rw,nosuid - devtmpfs udev rw
95 78 0:50 / /proc/acpi ro,relatime - tmpfs tmpfs ro
96 78 0:45 /sys /proc/sys ro,nosuid,nodev,noexec,relatime - proc proc rw
";
    assert_eq!(mountinfo_excess(table, &expected()), Vec::<String>::new());
    let widened = format!(
        "{}{}",
        table.replace("/proc/sys ro,", "/proc/sys rw,"),
        "97 77 0:5 / /host-dev rw - devtmpfs udev rw\n98 77 254:0 / /host rw - ext4 /dev/vda rw\n"
    );
    let all = mountinfo_excess(&widened, &expected()).join("; ");
    for want in [
        "mount table: /proc/sys writable",
        "a devtmpfs mount at /host-dev",
        "a ext4 mount at /host",
    ] {
        assert!(all.contains(want), "{want}: {all}");
    }
}
