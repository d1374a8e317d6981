//! `stasisctl bench`: the same pod workloads through a list of CRI runtime handlers, one
//! comparison table. A handler whose pods are served by a shim with the stasis Checkpoint
//! service (any backend) is checkpointed and restored as a pod; any other runtime (containerd's
//! own runc shim, say) is checkpointed container by container through CRI, the only generic
//! way, and has no pod restore to measure.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::{
    archive::Compression,
    cri::{self, api},
    display::human,
    ops::{
        checkpoint::{self, CheckpointArgs, Destination},
        restore::{self, RestoreArgs, Source},
        Target,
    },
    policy::Policy,
    shim,
    workload::{
        container_config, counter_loop, memory_token, pod_config, read_counter, violations,
    },
};

pub struct BenchArgs {
    pub handlers: Vec<String>,
    pub containers: Vec<usize>,
    pub runs: usize,
    pub image: String,
    pub work_dir: PathBuf,
}

/// One handler on one pod size: medians over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub handler: String,
    pub containers: usize,
    /// Backend that wrote the checkpoint ("runc", "runsc", …), or how it was taken.
    pub engine: String,
    pub method: String,
    pub pod_start_ms: f64,
    pub checkpoint_ms: Option<f64>,
    pub frozen_ms: Option<f64>,
    pub archive_bytes: Option<u64>,
    pub restore_ms: Option<f64>,
    /// "held", "violated: …", or why it could not be checked.
    pub consistency: String,
}

struct Sample {
    engine: String,
    method: String,
    start: f64,
    checkpoint: Option<f64>,
    frozen: Option<f64>,
    bytes: Option<u64>,
    restore: Option<f64>,
    consistency: String,
}

const COUNTER: &str = "/counter";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

async fn remove_pod(rt: &mut cri::Runtime, id: &str) {
    let _ = cri::remove_pod(rt, id).await;
}

/// Starts a pod of `n` counter containers; returns the pod id, the containers (name, id) and
/// the time until all of them ran.
async fn start_pod(
    rt: &mut cri::Runtime,
    handler: &str,
    name: &str,
    n: usize,
    image: &str,
    logs: &Path,
) -> Result<(String, Vec<(String, String)>, Duration)> {
    let pod = pod_config(name, logs);
    let t = Instant::now();
    let pod_id = rt
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: handler.to_string(),
        })
        .await
        .with_context(|| format!("run pod {name} with handler {handler}"))?
        .into_inner()
        .pod_sandbox_id;
    let mut ids = Vec::new();
    let started = async {
        for i in 0..n {
            let cname = format!("c{i}");
            let cfg = container_config(&cname, image, &["sh", "-c", &counter_loop(COUNTER)]);
            let id = rt
                .create_container(api::CreateContainerRequest {
                    pod_sandbox_id: pod_id.clone(),
                    config: Some(cfg),
                    sandbox_config: Some(pod.clone()),
                })
                .await
                .with_context(|| format!("create container {cname} in {name}"))?
                .into_inner()
                .container_id;
            rt.start_container(api::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .with_context(|| format!("start container {cname} in {name}"))?;
            ids.push((cname, id));
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = started {
        remove_pod(rt, &pod_id).await;
        return Err(e);
    }
    Ok((pod_id, ids, t.elapsed()))
}

/// The restored pod's containers continue from the checkpoint and run on, and no file got
/// ahead of its process's memory.
async fn check_restored(
    rt: &mut cri::Runtime,
    pod_id: &str,
    before: &[(String, u64, String)],
) -> Result<String> {
    let restored = cri::pod_containers(rt, pod_id).await?;
    if restored.len() != before.len() {
        return Ok(format!(
            "violated: {} of {} containers restored",
            restored.len(),
            before.len()
        ));
    }
    for c in &restored {
        let name = c
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let Some((_, was, token)) = before.iter().find(|(n, _, _)| *n == name) else {
            return Ok(format!("violated: {name} was not in the checkpointed pod"));
        };
        // A value only the process's memory held: a process started afresh would differ.
        let now_token = memory_token(rt, &c.id, COUNTER).await?;
        if now_token != *token {
            return Ok(format!(
                "violated: {name} memory not restored (token {now_token} != {token})"
            ));
        }
        let now = read_counter(rt, &c.id, COUNTER).await?;
        if now < *was {
            return Ok(format!(
                "violated: {name} counter {now} < {was} at checkpoint"
            ));
        }
        let v = violations(rt, &c.id).await?;
        if !v.is_empty() {
            return Ok(format!("violated: {name}: {v}"));
        }
        let mut moved = false;
        for _ in 0..100 {
            if read_counter(rt, &c.id, COUNTER).await? > now {
                moved = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !moved {
            return Ok(format!("violated: {name} does not run after restore"));
        }
    }
    Ok("held".into())
}

/// One pod of `n` containers under `handler`: started, its counters seen moving, checkpointed
/// live, removed, restored, checked.
async fn one_run(t: &Target, a: &BenchArgs, handler: &str, n: usize, run: usize) -> Result<Sample> {
    let mut rt = cri::connect(Path::new(&t.address)).await?;
    let tag: String = handler
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let name = format!("bench-{tag}-{n}-{run}-{}", std::process::id());
    let (pod_id, ids, start) = start_pod(
        &mut rt,
        handler,
        &name,
        n,
        &a.image,
        &a.work_dir.join("logs"),
    )
    .await?;
    let started = Started {
        handler,
        name: &name,
        pod_id: &pod_id,
        ids: &ids,
        start,
    };
    let result = measure(t, a, &mut rt, &started).await;
    remove_pod(&mut rt, &pod_id).await;
    result
}

/// A bench pod that runs.
struct Started<'a> {
    handler: &'a str,
    name: &'a str,
    pod_id: &'a str,
    /// (container name, id)
    ids: &'a [(String, String)],
    /// Time to start it.
    start: Duration,
}

/// Each container's counter, once it moves, with its memory token.
async fn counters_before(
    rt: &mut cri::Runtime,
    ids: &[(String, String)],
) -> Result<Vec<(String, u64, String)>> {
    let mut before = Vec::new();
    for (cname, id) in ids {
        // Running before it is checkpointed: the counter moves.
        let first = read_counter(rt, id, COUNTER).await?;
        let mut moved = false;
        for _ in 0..200 {
            if read_counter(rt, id, COUNTER).await? > first {
                moved = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::ensure!(moved, "{cname}: its counter never moved");
        let token = memory_token(rt, id, COUNTER).await?;
        before.push((cname.clone(), read_counter(rt, id, COUNTER).await?, token));
    }
    Ok(before)
}

/// Checkpoints the pod as a pod (a stasis Checkpoint service) and restores it, or else
/// container by container through CRI.
async fn measure(
    t: &Target,
    a: &BenchArgs,
    rt: &mut cri::Runtime,
    p: &Started<'_>,
) -> Result<Sample> {
    let before = counters_before(rt, p.ids).await?;
    let archive = a.work_dir.join(format!("{}.tar", p.name));
    let args = CheckpointArgs {
        pod: p.pod_id.to_string(),
        destination: Destination::Archive {
            path: archive.clone(),
            compression: Compression::None,
            recipients: Vec::new(),
        },
        leave_running: true,
        containers: Vec::new(),
        tcp_established: false,
        file_locks: false,
        timeout: 0,
        space_check: true,
        sign: None,
        hold_secs: None,
    };
    let o = match checkpoint::checkpoint_pod(t, args).await {
        Ok(o) => o,
        Err(e) if format!("{e:#}").contains(shim::NO_CHECKPOINT_SERVICE) => {
            return checkpoint_through_cri(a, rt, p).await
        }
        Err(e) => return Err(e),
    };
    let frozen = o.response.timings.as_ref().map(|t| t.frozen_ms);
    remove_pod(rt, p.pod_id).await;
    let t0 = Instant::now();
    let restored = restore::restore_pod(
        t,
        &RestoreArgs {
            registry: Default::default(),
            name: Some(format!("{}-restored", p.name)),
            runtime_handler: Some(p.handler.to_string()),
            offered_runtime_handler: None,
            // The bench's own pods, restored from archives it just wrote (their logs live
            // in its work directory).
            policy: Policy {
                operator_host_paths: vec![a.work_dir.clone()],
                ..Policy::default()
            },
            replace_volumes: false,
            opening: Default::default(),
            lazy: false,
            wait_pages: true,
            remote_pages: None,
        },
        Source::Archive {
            path: archive.clone(),
            leave_pages: false,
        },
    )
    .await;
    let _ = std::fs::remove_file(&archive);
    let new_pod = restored.with_context(|| format!("restore {}", p.name))?;
    let restore = ms(t0.elapsed());
    let consistency = check_restored(rt, &new_pod, &before).await;
    remove_pod(rt, &new_pod).await;
    Ok(Sample {
        engine: o.response.engine.clone(),
        method: "pod: stasis Checkpoint service".into(),
        start: ms(p.start),
        checkpoint: Some(o.total_ms),
        frozen,
        bytes: Some(o.delivered.bytes),
        restore: Some(restore),
        consistency: consistency?,
    })
}

/// The generic fallback: CRI's per-container checkpoint, one after the other.
async fn checkpoint_through_cri(
    a: &BenchArgs,
    rt: &mut cri::Runtime,
    p: &Started<'_>,
) -> Result<Sample> {
    let t0 = Instant::now();
    let mut bytes = 0;
    for (cname, id) in p.ids {
        let loc = a.work_dir.join(format!("{}-{cname}.tar", p.name));
        rt.checkpoint_container(api::CheckpointContainerRequest {
            container_id: id.clone(),
            location: loc.display().to_string(),
            timeout: 120,
        })
        .await
        .with_context(|| format!("CRI CheckpointContainer {cname} of {}", p.name))?;
        bytes += std::fs::metadata(&loc).map(|m| m.len()).unwrap_or(0);
        let _ = std::fs::remove_file(&loc);
    }
    Ok(Sample {
        engine: "-".into(),
        method: "containers one by one: CRI CheckpointContainer".into(),
        start: ms(p.start),
        checkpoint: Some(ms(t0.elapsed())),
        frozen: None,
        bytes: Some(bytes),
        restore: None,
        consistency: "not checked: no pod restore through CRI".into(),
    })
}

pub async fn run(t: &Target, a: &BenchArgs) -> Result<Vec<BenchRow>> {
    if a.handlers.is_empty() || a.containers.is_empty() || a.runs == 0 {
        bail!("bench needs at least one handler, one pod size and one run");
    }
    std::fs::create_dir_all(&a.work_dir)
        .with_context(|| format!("create {}", a.work_dir.display()))?;
    let mut rows = Vec::new();
    for &n in &a.containers {
        for handler in &a.handlers {
            let mut samples = Vec::new();
            for run in 0..a.runs {
                eprintln!(
                    "bench: handler {handler}, {n} container(s), run {}/{}",
                    run + 1,
                    a.runs
                );
                samples.push(
                    one_run(t, a, handler, n, run)
                        .await
                        .with_context(|| format!("handler {handler}, {n} container(s)"))?,
                );
            }
            let pick =
                |f: &dyn Fn(&Sample) -> Option<f64>| median(samples.iter().filter_map(f).collect());
            let consistency = samples
                .iter()
                .find(|s| s.consistency != "held")
                .map(|s| s.consistency.clone())
                .unwrap_or_else(|| "held".into());
            rows.push(BenchRow {
                handler: handler.clone(),
                containers: n,
                engine: samples[0].engine.clone(),
                method: samples[0].method.clone(),
                pod_start_ms: pick(&|s| Some(s.start)).unwrap_or_default(),
                checkpoint_ms: pick(&|s| s.checkpoint),
                frozen_ms: pick(&|s| s.frozen),
                archive_bytes: pick(&|s| s.bytes.map(|b| b as f64)).map(|b| b as u64),
                restore_ms: pick(&|s| s.restore),
                consistency,
            });
        }
    }
    Ok(rows)
}

/// A Markdown table: the first row is the header, columns padded to their widest cell.
pub fn render_table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for (n, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        text.push_str(&format!("| {} |\n", cells.join(" | ")));
        if n == 0 {
            let sep: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            text.push_str(&format!("|-{}-|\n", sep.join("-|-")));
        }
    }
    text
}

/// Each value with its ratio against the first handler's on the same pod size.
pub fn table(rows: &[BenchRow]) -> String {
    let base = |r: &BenchRow| rows.iter().find(|b| b.containers == r.containers);
    let with_ratio = |v: Option<f64>, b: Option<f64>, unit: &dyn Fn(f64) -> String| match (v, b) {
        (Some(v), Some(b)) if b > 0.0 => format!("{} ({:.2}x)", unit(v), v / b),
        (Some(v), _) => unit(v),
        _ => "-".into(),
    };
    let msf = |v: f64| format!("{v:.0} ms");
    let bytes = |v: f64| human(v as u64);
    let mut out = vec![vec![
        "handler".to_string(),
        "engine".into(),
        "containers".into(),
        "pod start".into(),
        "checkpoint".into(),
        "frozen window".into(),
        "archive".into(),
        "restore".into(),
        "consistency".into(),
    ]];
    for r in rows {
        let b = base(r).expect("a row is its own base at worst");
        out.push(vec![
            r.handler.clone(),
            r.engine.clone(),
            r.containers.to_string(),
            with_ratio(Some(r.pod_start_ms), Some(b.pod_start_ms), &msf),
            with_ratio(r.checkpoint_ms, b.checkpoint_ms, &msf),
            with_ratio(r.frozen_ms, b.frozen_ms, &msf),
            with_ratio(
                r.archive_bytes.map(|v| v as f64),
                b.archive_bytes.map(|v| v as f64),
                &bytes,
            ),
            with_ratio(r.restore_ms, b.restore_ms, &msf),
            r.consistency.clone(),
        ]);
    }
    let mut text = render_table(&out);
    let methods: Vec<String> = rows
        .iter()
        .map(|r| format!("{}: {}", r.handler, r.method))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    text.push_str(&format!(
        "ratios against {} on the same pod size; checkpoint = wall time incl. packaging. {}\n",
        rows[0].handler,
        methods.join("; ")
    ));
    text
}
