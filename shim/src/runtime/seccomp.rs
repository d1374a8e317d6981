//! Is a seccomp filter chain from CRIU's images at least as strict as the spec's profile?
//!
//! The filter a fresh process of the spec gets is compiled by runc through libseccomp; its
//! bytes depend on both versions, so the images' BPF is not compared byte for byte. It is
//! run instead, the way the kernel runs it (classic BPF over `struct seccomp_data`, every
//! filter of the chain, the strictest action wins), for every system call number of this
//! architecture, and its action must be at least as strict as the spec's for the same call
//! (the spec's rules evaluated on the same arguments). A chain that lets through a call the
//! spec refuses, or that is not a valid program, is refused. Calls the spec allows only with
//! certain arguments are judged on zero arguments; the spec's most permissive matching rule
//! is taken, so an honest filter never fails.

use std::str::FromStr;

use super::criu_image::SeccompFilter;

/// `AUDIT_ARCH_X86_64`: the architecture restored tasks run as.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// System call numbers tried: every x86-64 call has a number below this.
const SYSCALLS: u32 = 1024;
/// The kernel's limit on instructions in one filter (`BPF_MAXINSNS`).
const MAX_INSNS: usize = 4096;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ACTION: u32 = 0xffff_0000;

/// How strict an action is, as the kernel orders them (lower is stricter).
fn rank(ret: u32) -> i32 {
    (ret & RET_ACTION) as i32
}

fn action_name(ret: u32) -> &'static str {
    match ret & RET_ACTION {
        RET_KILL_PROCESS => "kill the process",
        RET_KILL_THREAD => "kill the thread",
        RET_TRAP => "trap",
        RET_ERRNO => "fail with an errno",
        RET_USER_NOTIF => "notify",
        RET_TRACE => "trace",
        RET_LOG => "log and allow",
        RET_ALLOW => "allow",
        _ => "an unknown action",
    }
}

/// A condition on one argument (runtime-spec `LinuxSeccompArg`).
#[derive(Debug, Clone)]
struct Arg {
    index: usize,
    value: u64,
    value_two: u64,
    op: String,
}

impl Arg {
    fn holds(&self, args: &[u64; 6]) -> bool {
        let a = args.get(self.index).copied().unwrap_or(0);
        match self.op.as_str() {
            "SCMP_CMP_NE" => a != self.value,
            "SCMP_CMP_LT" => a < self.value,
            "SCMP_CMP_LE" => a <= self.value,
            "SCMP_CMP_EQ" => a == self.value,
            "SCMP_CMP_GE" => a >= self.value,
            "SCMP_CMP_GT" => a > self.value,
            "SCMP_CMP_MASKED_EQ" => a & self.value == self.value_two,
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    numbers: Vec<u32>,
    action: u32,
    args: Vec<Arg>,
}

/// The spec's seccomp profile, as actions by system call number.
#[derive(Debug, Clone)]
pub struct Profile {
    default: u32,
    rules: Vec<Rule>,
}

fn action_of(name: &str) -> u32 {
    match name {
        "SCMP_ACT_KILL_PROCESS" => RET_KILL_PROCESS,
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => RET_KILL_THREAD,
        "SCMP_ACT_TRAP" => RET_TRAP,
        "SCMP_ACT_ERRNO" => RET_ERRNO,
        "SCMP_ACT_NOTIFY" => RET_USER_NOTIF,
        "SCMP_ACT_TRACE" => RET_TRACE,
        "SCMP_ACT_LOG" => RET_LOG,
        "SCMP_ACT_ALLOW" => RET_ALLOW,
        // An action this reader does not know is taken as the most permissive: the images'
        // filter is then never held to more than the spec could mean.
        _ => RET_ALLOW,
    }
}

impl Profile {
    pub fn from_spec(v: &serde_json::Value) -> Self {
        let default = action_of(
            v.get("defaultAction")
                .and_then(|a| a.as_str())
                .unwrap_or(""),
        );
        let rules = v
            .get("syscalls")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .map(|r| Rule {
                        numbers: r
                            .get("names")
                            .and_then(|n| n.as_array())
                            .map(|n| {
                                n.iter()
                                    .filter_map(|n| n.as_str())
                                    .filter_map(|n| syscalls::Sysno::from_str(n).ok())
                                    .map(|s| s.id() as u32)
                                    .collect()
                            })
                            .unwrap_or_default(),
                        action: action_of(r.get("action").and_then(|a| a.as_str()).unwrap_or("")),
                        args: r
                            .get("args")
                            .and_then(|a| a.as_array())
                            .map(|a| {
                                a.iter()
                                    .map(|c| Arg {
                                        index: c.get("index").and_then(|i| i.as_u64()).unwrap_or(0)
                                            as usize,
                                        value: c.get("value").and_then(|i| i.as_u64()).unwrap_or(0),
                                        value_two: c
                                            .get("valueTwo")
                                            .and_then(|i| i.as_u64())
                                            .unwrap_or(0),
                                        op: c
                                            .get("op")
                                            .and_then(|o| o.as_str())
                                            .unwrap_or("")
                                            .to_string(),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Profile { default, rules }
    }

    /// The spec's action for a call: its most permissive matching rule, else the default.
    fn action(&self, nr: u32, args: &[u64; 6]) -> u32 {
        self.rules
            .iter()
            .filter(|r| r.numbers.contains(&nr) && r.args.iter().all(|a| a.holds(args)))
            .map(|r| r.action)
            .max_by_key(|a| rank(*a))
            .unwrap_or(self.default)
    }
}

/// Runs one classic BPF program over a `struct seccomp_data` (`data`), as the kernel's
/// seccomp does: a program that reads outside the data, jumps out of itself or ends without
/// a return is invalid.
fn run(prog: &[[u8; 8]], data: &[u8; 64]) -> Result<u32, String> {
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    let word = |k: u32| -> Result<u32, String> {
        let k = k as usize;
        if !k.is_multiple_of(4) || k + 4 > data.len() {
            return Err(format!("a load at offset {k}"));
        }
        Ok(u32::from_ne_bytes(data[k..k + 4].try_into().unwrap()))
    };
    // Forward jumps only (classic BPF): at most one pass over the program.
    while pc < prog.len() {
        let ins = prog[pc];
        let code = u16::from_ne_bytes([ins[0], ins[1]]);
        let (jt, jf) = (ins[2] as usize, ins[3] as usize);
        let k = u32::from_ne_bytes([ins[4], ins[5], ins[6], ins[7]]);
        pc += 1;
        let src = if code & 0x08 != 0 { x } else { k };
        match code & 0x07 {
            0x00 => {
                a = match code {
                    0x20 => word(k)?,          // ld [k]
                    0x00 => k,                 // ld #k
                    0x80 => data.len() as u32, // ld len
                    0x60 => *mem.get(k as usize).ok_or("a scratch slot")?,
                    _ => return Err(format!("instruction {code:#x}")),
                }
            }
            0x01 => {
                x = match code {
                    0x01 => k,
                    0x81 => data.len() as u32,
                    0x61 => *mem.get(k as usize).ok_or("a scratch slot")?,
                    _ => return Err(format!("instruction {code:#x}")),
                }
            }
            0x02 => *mem.get_mut(k as usize).ok_or("a scratch slot")? = a,
            0x03 => *mem.get_mut(k as usize).ok_or("a scratch slot")? = x,
            0x04 => a = alu(code, a, src)?,
            0x05 => {
                let off = jump_offset(code, a, src, k, jt, jf)?;
                pc = pc
                    .checked_add(off)
                    .filter(|p| *p < prog.len())
                    .ok_or("a jump out of the program")?;
            }
            0x06 => return Ok(if code & 0x10 != 0 { a } else { k }),
            0x07 => match code {
                0x07 => x = a,
                0x87 => a = x,
                _ => return Err(format!("instruction {code:#x}")),
            },
            _ => unreachable!(),
        }
    }
    Err("no return at its end".into())
}

/// A classic BPF ALU instruction (`code`) on the accumulator `a` and its operand `src`.
fn alu(code: u16, a: u32, src: u32) -> Result<u32, String> {
    Ok(match code & 0xf0 {
        0x00 => a.wrapping_add(src),
        0x10 => a.wrapping_sub(src),
        0x20 => a.wrapping_mul(src),
        0x30 => a.checked_div(src).ok_or("a division by zero")?,
        0x40 => a | src,
        0x50 => a & src,
        0x60 => a.checked_shl(src).unwrap_or(0),
        0x70 => a.checked_shr(src).unwrap_or(0),
        0x80 => a.wrapping_neg(),
        0x90 => a.checked_rem(src).ok_or("a division by zero")?,
        0xa0 => a ^ src,
        _ => return Err(format!("instruction {code:#x}")),
    })
}

/// How far a classic BPF jump instruction (`code`) moves on: `k` unconditionally, else `jt`
/// when its test of `a` against `src` holds and `jf` when not.
fn jump_offset(code: u16, a: u32, src: u32, k: u32, jt: usize, jf: usize) -> Result<usize, String> {
    let taken = match code & 0xf0 {
        0x00 => return Ok(k as usize),
        0x10 => a == src,
        0x20 => a > src,
        0x30 => a >= src,
        0x40 => a & src != 0,
        _ => return Err(format!("instruction {code:#x}")),
    };
    Ok(if taken { jt } else { jf })
}

fn program(bytes: &[u8]) -> Result<Vec<[u8; 8]>, String> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(8) || bytes.len() / 8 > MAX_INSNS {
        return Err(format!("a program of {} bytes", bytes.len()));
    }
    Ok(bytes.chunks(8).map(|c| c.try_into().unwrap()).collect())
}

/// Whether the chain that starts at `filters[index]` (following each filter's `prev`) is at
/// least as strict as `profile` for every system call. An error says where it is not.
pub fn chain_refuses_what(
    filters: &[SeccompFilter],
    index: u32,
    profile: &Profile,
) -> Result<(), String> {
    let mut chain = Vec::new();
    let mut at = Some(index);
    while let Some(i) = at {
        let f = filters
            .get(i as usize)
            .ok_or_else(|| format!("filter {i} is not in seccomp.img"))?;
        if chain.len() >= filters.len() {
            return Err("its filters form a loop".into());
        }
        chain.push(program(&f.filter).map_err(|e| format!("filter {i}: {e}"))?);
        at = f.prev;
    }
    let args = [0u64; 6];
    for nr in 0..SYSCALLS {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&AUDIT_ARCH_X86_64.to_ne_bytes());
        let mut got = RET_ALLOW;
        for p in &chain {
            let r = run(p, &data)?;
            if rank(r) < rank(got) {
                got = r;
            }
        }
        let want = profile.action(nr, &args);
        if rank(got) > rank(want) {
            let name = syscalls::Sysno::new(nr as usize)
                .map(|s| s.name().to_string())
                .unwrap_or_else(|| format!("system call {nr}"));
            return Err(format!(
                "it would {} {name}, which the spec's profile would {}",
                action_name(got),
                action_name(want)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ins(code: u16, jt: u8, jf: u8, k: u32) -> Vec<u8> {
        let mut v = code.to_ne_bytes().to_vec();
        v.extend([jt, jf]);
        v.extend(k.to_ne_bytes());
        v
    }

    /// `ld nr; jeq #nr, allow, deny`: allow only `allowed`.
    fn only(allowed: u32, deny: u32) -> Vec<u8> {
        [
            ins(0x20, 0, 0, 0),
            ins(0x15, 0, 1, allowed),
            ins(0x06, 0, 0, RET_ALLOW),
            ins(0x06, 0, 0, deny),
        ]
        .concat()
    }

    fn filter(bytes: Vec<u8>, prev: Option<u32>) -> SeccompFilter {
        SeccompFilter {
            filter: bytes,
            prev,
            flags: None,
        }
    }

    #[test]
    fn a_filter_is_judged_by_what_it_lets_through() {
        let profile = Profile::from_spec(&serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                         {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}]
        }));
        let read = syscalls::Sysno::read.id() as u32;
        // As strict: passes; stricter: passes.
        assert!(
            chain_refuses_what(&[filter(only(read, RET_ERRNO | 1), None)], 0, &profile).is_ok()
        );
        assert!(
            chain_refuses_what(&[filter(only(read, RET_KILL_PROCESS), None)], 0, &profile).is_ok()
        );
        // Allow everything: refused, naming a call.
        let all = ins(0x06, 0, 0, RET_ALLOW);
        let err = chain_refuses_what(&[filter(all.clone(), None)], 0, &profile).unwrap_err();
        assert!(err.contains("would allow write"), "{err}");
        // A permissive filter on top of a strict one: the strict one still rules.
        let chain = [filter(only(read, RET_ERRNO), None), filter(all, Some(0))];
        assert!(chain_refuses_what(&chain, 1, &profile).is_ok());
        // Loops, bad indexes and programs without a return are refused.
        assert!(
            chain_refuses_what(&[filter(only(read, RET_ERRNO), Some(0))], 0, &profile).is_err()
        );
        assert!(chain_refuses_what(&[], 0, &profile).is_err());
        assert!(chain_refuses_what(&[filter(ins(0x20, 0, 0, 0), None)], 0, &profile).is_err());
        assert!(chain_refuses_what(&[filter(ins(0x20, 0, 0, 64), None)], 0, &profile).is_err());
    }
}
