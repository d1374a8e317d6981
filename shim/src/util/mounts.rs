//! The kernel's mount table (`/proc/self/mountinfo`), read as the kernel states it now: a
//! mount's id stays while the directories above it are renamed, its path does not.

use std::path::{Path, PathBuf};

/// One line of the table: the fields we use.
#[derive(Debug, PartialEq)]
pub struct Mount {
    pub id: u64,
    pub point: PathBuf,
    pub fstype: String,
}

/// This process's mount table, in the kernel's order (a later line is mounted over an earlier
/// one at the same point).
pub fn table() -> Vec<Mount> {
    parse(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// The id of the topmost mount at `path`.
pub fn id_at(path: &Path) -> Option<u64> {
    table()
        .into_iter()
        .rev()
        .find(|m| m.point == path)
        .map(|m| m.id)
}

pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut fields = pre.split(' ');
            let id = fields.next()?.parse().ok()?;
            let point = unescape(fields.nth(3)?);
            let fstype = post.split(' ').next()?.to_string();
            Some(Mount { id, point, fstype })
        })
        .collect()
}

/// The table writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_give_id_point_and_type_with_escapes_undone() {
        let text = "\
22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
813 29 0:88 / /run/a\\040b/pod-shm rw,nosuid,nodev,noexec,relatime shared:420 - tmpfs shm rw,size=65536k
garbage line
";
        assert_eq!(
            parse(text),
            vec![
                Mount {
                    id: 22,
                    point: "/sys".into(),
                    fstype: "sysfs".into()
                },
                Mount {
                    id: 813,
                    point: "/run/a b/pod-shm".into(),
                    fstype: "tmpfs".into()
                },
            ]
        );
        assert_eq!(unescape("a\\134b\\011"), PathBuf::from("a\\b\t"));
        // A backslash not followed by three octal digits is itself.
        assert_eq!(unescape("a\\9"), PathBuf::from("a\\9"));
    }
}
