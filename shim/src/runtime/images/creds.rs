//! A task's core image: its credentials and its seccomp filter against the spec's.

use std::collections::HashMap;

use super::{
    img,
    restored::{cap_names, CAP_SETPCAP},
    seccomp, Expected,
};

/// What one task's core image asks for beyond `expected`.
pub(super) fn core_excess(
    core: &img::CoreEntry,
    expected: &Expected,
    filters: &[img::SeccompFilter],
    verdicts: &mut HashMap<u32, std::result::Result<(), String>>,
) -> Vec<String> {
    let mut out = Vec::new();
    // A zombie is restored only to be reaped; a helper runs CRIU's code alone, and both
    // carry no thread state.
    if core.tc.as_ref().is_some_and(|t| {
        matches!(
            t.task_state,
            img::TASK_DEAD | img::TASK_ZOMBIE | img::TASK_HELPER
        )
    }) && core.thread_core.is_none()
    {
        return out;
    }
    let Some(thread) = &core.thread_core else {
        return vec!["no thread state".into()];
    };
    match &thread.creds {
        None => out.push("no credentials".into()),
        Some(c) => creds_excess(c, expected, &mut out),
    }
    let mode = thread
        .seccomp_mode
        .or(core.tc.as_ref().and_then(|t| t.old_seccomp_mode))
        .unwrap_or(0);
    let filter = thread
        .seccomp_filter
        .or(core.tc.as_ref().and_then(|t| t.old_seccomp_filter));
    if let Some(profile) = &expected.seccomp {
        if mode != 2 {
            out.push(format!("seccomp mode {mode} where the spec has a filter"));
        } else {
            let index = filter.unwrap_or(u32::MAX);
            let verdict = verdicts
                .entry(index)
                .or_insert_with(|| seccomp::chain_refuses_what(filters, index, profile));
            if let Err(why) = verdict {
                out.push(format!("a seccomp filter weaker than the spec's: {why}"));
            }
        }
    }
    out
}

/// What a task's credentials hold beyond `expected`, added to `out`.
fn creds_excess(c: &img::CredsEntry, expected: &Expected, out: &mut Vec<String>) {
    let b = &expected.bounds;
    let mut excess: Vec<(u64, Vec<&str>)> = Vec::new();
    for (set, words) in [
        ("inheritable", &c.cap_inh),
        ("permitted", &c.cap_prm),
        ("effective", &c.cap_eff),
        ("bounding", &c.cap_bnd),
        ("ambient", &c.cap_amb),
    ] {
        let extra = img::cap_mask(words) & !b.bounding;
        if extra != 0 {
            match excess.iter_mut().find(|(m, _)| *m == extra) {
                Some((_, sets)) => sets.push(set),
                None => excess.push((extra, vec![set])),
            }
        }
    }
    for (extra, sets) in excess {
        out.push(format!(
            "{} capabilities {} beyond the spec's",
            sets.join(", "),
            cap_names(extra)
        ));
    }
    if b.no_new_privs && c.no_new_privs != Some(1) {
        out.push("no_new_privs off where the spec sets it".into());
    }
    if c.secbits != 0 && b.bounding & CAP_SETPCAP == 0 {
        out.push(format!("securebits {:#x} without CAP_SETPCAP", c.secbits));
    }
    // Identity: without a way to change it (no_new_privs, and no CAP_SETUID or
    // CAP_SETGID), every id is the spec's user.
    if b.uid_fixed() {
        let ids = [c.uid, c.euid, c.suid, c.fsuid];
        if ids.iter().any(|u| *u != b.uid) {
            out.push(format!(
                "uids {ids:?} where the spec's user is {} and nobody may change it",
                b.uid
            ));
        }
    }
    if b.gid_fixed() {
        let ids = [c.gid, c.egid, c.sgid, c.fsgid];
        if ids.iter().any(|g| *g != b.gid) {
            out.push(format!(
                "gids {ids:?} where the spec's group is {} and nobody may change it",
                b.gid
            ));
        }
        let extra: Vec<u32> = c
            .groups
            .iter()
            .copied()
            .filter(|g| *g != b.gid && !expected.groups.contains(g))
            .collect();
        if !extra.is_empty() {
            out.push(format!("supplementary groups {extra:?} beyond the spec's"));
        }
    }
    if let Some(p) = c.lsm_profile.as_deref().filter(|p| !p.is_empty()) {
        let mine = expected.lsm.as_deref().unwrap_or("");
        // AppArmor reports the mode after the name: "name (enforce)".
        let name = p.split(" (").next().unwrap_or(p);
        if name != mine && p != mine {
            out.push(format!("LSM profile {p:?} where the spec has {mine:?}"));
        }
    }
    if c.lsm_sockcreate.as_deref().is_some_and(|s| !s.is_empty()) {
        out.push("an LSM socket-creation label".into());
    }
    if c.apparmor_data.as_ref().is_some_and(|d| !d.is_empty()) {
        out.push("AppArmor policy to load".into());
    }
}
