//! The pod workloads the tests and `stasisctl bench` run: CRI configs for a pod with its own
//! network and for busybox containers, and the consistency loop.

use std::path::Path;

use crate::cri::api as cri;

/// Network, PID and IPC namespaces shared by the whole pod.
fn pod_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Pod as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A pod with its own network (CNI), sharing PID/IPC/UTS namespaces among its containers.
pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "default".to_string(),
            attempt: 0,
        }),
        hostname: format!("{name}-host"),
        log_directory: log_dir.join(name).display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A busybox container running `cmd`.
pub fn container_config(name: &str, image: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The consistency loop of the checkpoint tests: a memory counter written to a file; after a
/// restore the file must never be ahead of memory (a violation is logged to /violations).
pub fn counter_loop(file: &str) -> String {
    format!(
        "i=0; while true; do v=$(cat {file} 2>/dev/null || echo 0); \
         if [ \"$v\" -gt \"$i\" ]; then echo \"file=$v memory=$i\" >> /violations; fi; \
         i=$((i+1)); echo $i > {file}; sleep 0.01; done"
    )
}
