use super::*;
use paths::{DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS};

fn pod(json: serde_json::Value) -> api::PodSandboxConfig {
    crate::cri::from_go_json(&json).unwrap()
}

fn container(json: serde_json::Value) -> api::ContainerConfig {
    crate::cri::from_go_json(&json).unwrap()
}

fn defaults() -> Policy {
    assert!(Policy::load(Some(Path::new("/nonexistent"))).is_err());
    Policy::default()
}

#[test]
fn an_ordinary_pod_asks_for_nothing_refused() {
    let p = pod(serde_json::json!({"metadata": {"name": "web"}}));
    let c = container(serde_json::json!({
        "metadata": {"name": "app"},
        "mounts": [{"container_path": "/data",
                    "host_path": "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/d"}],
        "linux": {"security_context": {"capabilities": {"add_capabilities": ["CHOWN"]}}}
    }));
    let reqs = requests(&p, &[("app".into(), c)]);
    defaults().check(&reqs).unwrap();
}

#[test]
fn host_ports_selinux_and_node_seccomp_files_are_requests() {
    let p = pod(serde_json::json!({
        "port_mappings": [{"container_port": 80, "host_port": 8080},
                          {"container_port": 81}],
        "linux": {"security_context": {"selinux_options": {"type": "spc_t"}}}
    }));
    let c = container(serde_json::json!({
        "metadata": {"name": "app"},
        "linux": {"security_context": {
            "seccomp": {"profile_type": 2, "localhost_ref": "/etc/shadow"}}}
    }));
    let ok = container(serde_json::json!({
        "metadata": {"name": "ok"},
        "linux": {"security_context": {
            "seccomp": {"profile_type": 2,
                        "localhost_ref": "/var/lib/kubelet/seccomp/audit.json"}}}
    }));
    let reqs = requests(&p, &[("app".into(), c), ("ok".into(), ok)]);
    let err = defaults().check(&reqs).unwrap_err().to_string();
    for want in [
        "pod: node port 8080 to container port 80 [host-ports]",
        "pod: SELinux type spc_t [selinux]",
        "container app: seccomp profile from the node's file /etc/shadow [seccomp-localhost]",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(
        !err.contains("container ok") && !err.contains("port 81"),
        "{err}"
    );
    let legacy = container(serde_json::json!({
        "metadata": {"name": "old"},
        "linux": {"security_context": {"seccomp_profile_path": "localhost//etc/passwd"}}
    }));
    let err = defaults()
        .check(&requests(
            &pod(serde_json::json!({})),
            &[("old".into(), legacy)],
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/etc/passwd [seccomp-localhost]"), "{err}");
}

#[test]
fn apparmor_profiles_handlers_unknown_fields_and_registries_are_allow_listed() {
    let c = container(serde_json::json!({
        "metadata": {"name": "app"},
        "image": {"image": "x", "runtime_handler": "runc"},
        "linux": {"security_context": {
            "apparmor": {"profile_type": 2, "localhost_ref": "unconfined-ish"}}}
    }));
    let legacy = container(serde_json::json!({
        "linux": {"security_context": {"apparmor_profile": "localhost/old-style"}}
    }));
    let mut reqs = requests(
        &pod(serde_json::json!({})),
        &[("app".into(), c), ("old".into(), legacy)],
    );
    reqs.push(runtime_handler("stasis-privileged", "the archive"));
    reqs.extend(unknown_fields(
        "container app",
        "container-config.json",
        "ContainerConfig",
        &serde_json::json!({"linux": {"security_context": {"future_escape": true}}}),
    ));
    let mut p = defaults();
    p.learn_runtime_handlers(vec!["stasis".into()]);
    let err = p.check(&reqs).unwrap_err().to_string();
    for want in [
        "container app: AppArmor profile \"unconfined-ish\" loaded on the node [apparmor-localhost]",
        "container old: AppArmor profile \"old-style\" loaded on the node [apparmor-localhost]",
        "container app: runtime handler runc for its image [runtime-handler]",
        "pod: runtime handler stasis-privileged named by the archive [runtime-handler]",
        "container app: unknown field linux.security_context.future_escape in container-config.json [unknown-field]",
        "cannot be allowed",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    // Named by the policy, all but the unknown field pass; no flag allows that one.
    p.apparmor_profiles = vec!["unconfined-ish".into(), "old-style".into()];
    p.runtime_handlers = Some(vec!["runc".into(), "stasis-privileged".into()]);
    p.widen(&["runtime-handler,apparmor-localhost".into()], &[])
        .unwrap();
    let err = p.check(&reqs).unwrap_err().to_string();
    assert!(
        err.contains("1 thing") && err.contains("future_escape"),
        "{err}"
    );
    reqs.pop();
    p.check(&reqs).unwrap();

    assert_eq!(
        registry_host("127.0.0.1:5000/busybox@sha256:0"),
        "127.0.0.1:5000"
    );
    assert_eq!(registry_host("localhost/busybox@sha256:0"), "localhost");
    assert_eq!(registry_host("library/busybox@sha256:0"), "docker.io");
    assert_eq!(registry_host("busybox@sha256:0"), "docker.io");
    let mut p = defaults();
    let err = p
        .check_registry("app", "evil.example:5000/x@sha256:0")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("container app") && err.contains("--allow-registry evil.example:5000"),
        "{err}"
    );
    p.base_image_registries.push("evil.example:5000".into());
    p.check_registry("app", "evil.example:5000/x@sha256:0")
        .unwrap();
}

#[test]
fn host_paths_through_links_are_refused_where_they_resolve() {
    let d = std::env::temp_dir().join(format!("stasis-links-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("vol")).unwrap();
    std::os::unix::fs::symlink("/", d.join("vol/s")).unwrap();
    let mount = |host: &Path| {
        container(serde_json::json!({
            "metadata": {"name": "b"},
            "mounts": [{"container_path": "/host", "host_path": host.display().to_string()}]
        }))
    };
    check_host_paths_resolve("b", "", &mount(&d.join("vol"))).unwrap();
    check_host_paths_resolve("b", "", &mount(&d.join("vol/not-yet/x"))).unwrap();
    let mut logged = mount(&d.join("vol"));
    logged.log_path = "s/etc/cron.d/x".into();
    let err = check_host_paths_resolve("b", &d.join("vol").display().to_string(), &logged)
        .unwrap_err()
        .to_string();
    assert!(err.contains("symbolic link"), "{err}");
    let err = check_host_paths_resolve("b", "", &mount(&d.join("vol/s/etc")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("container b") && err.contains("symbolic link") && err.contains("(to /)"),
        "{err}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn host_paths_are_strictly_below_a_prefix_and_propagation_is_asked_for() {
    let c = container(serde_json::json!({
        "metadata": {"name": "app"},
        "mounts": [{"container_path": "/pods", "host_path": "/var/lib/kubelet/pods"},
                   {"container_path": "/v", "propagation": 2,
                    "host_path": "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/v"}]
    }));
    let err = defaults()
        .check(&requests(&pod(serde_json::json!({})), &[("app".into(), c)]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("host path /var/lib/kubelet/pods mounted at /pods"),
        "{err}"
    );
    assert!(
        !err.contains("u1/volumes/kubernetes.io~empty-dir/v mounted"),
        "{err}"
    );
    assert!(
        err.contains("bidirectional mount propagation at /v [mount-propagation]"),
        "{err}"
    );
}

#[test]
fn log_files_user_namespaces_and_other_containers_namespaces_are_requests() {
    let p = pod(serde_json::json!({
        "log_directory": "/var/log/pods/default_web_u1",
        "linux": {"security_context": {"namespace_options": {
            "userns_options": {"mode": 0, "uids": [{"host_id": 0, "container_id": 0, "length": 1}]}}}}
    }));
    let ok = container(serde_json::json!({"metadata": {"name": "ok"}, "log_path": "ok/0.log"}));
    let bad = container(serde_json::json!({
        "metadata": {"name": "bad"},
        "log_path": "../../../../etc/cron.d/x",
        "linux": {"security_context": {"namespace_options": {"pid": 3, "target_id": "other"}}},
        "mounts": [{"container_path": "/m", "host_path": "/var/lib/kubelet/pods/u1/volumes/v",
                    "uid_mappings": [{"host_id": 0, "container_id": 0, "length": 1}]}]
    }));
    let reqs = requests(&p, &[("ok".into(), ok), ("bad".into(), bad)]);
    let err = defaults().check(&reqs).unwrap_err().to_string();
    for want in [
        "pod: a user namespace with the archive's id mappings [user-namespaces]",
        "container bad: log file /var/log/pods/default_web_u1/../../../../etc/cron.d/x written by containerd",
        "--allow-host-path /var/log/pods/default_web_u1/../../../../etc/cron.d/x",
        "container bad: the PID namespace of container \"other\" [host-namespaces]",
        "container bad: an id-mapped mount at /m [user-namespaces]",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(!err.contains("container ok"), "{err}");
}

#[test]
fn a_cgroup_parent_must_be_strictly_below_a_root() {
    let at = |parent: &str| {
        let p = pod(serde_json::json!({"linux": {"cgroup_parent": parent}}));
        defaults().check(&requests(&p, &[]))
    };
    at("/kubepods/burstable/pod1234").unwrap();
    at("/stasis/restored-pod").unwrap();
    for root in [
        "/stasis",
        "/kubepods",
        "/stasis/",
        "/stasis/x/..",
        "/system.slice",
    ] {
        let err = at(root).unwrap_err().to_string();
        assert!(
            err.contains("cgroup parent") && err.contains("[cgroup-parent]"),
            "{root}: {err}"
        );
    }
}

#[test]
fn masked_and_read_only_paths_may_only_add_protection() {
    let with = |masked: &[&str], readonly: &[&str]| {
        let c = container(serde_json::json!({
            "metadata": {"name": "app"},
            "linux": {"security_context": {"masked_paths": masked, "readonly_paths": readonly}}
        }));
        requests(&pod(serde_json::json!({})), &[("app".into(), c)])
    };
    assert!(with(&[], &[]).is_empty(), "empty lists keep the runtime's");
    let mut more: Vec<&str> = DEFAULT_MASKED_PATHS.to_vec();
    more.push("/proc/extra");
    assert!(with(&more, DEFAULT_READONLY_PATHS).is_empty());
    let weaker = with(&["/nonexistent"], &["/nonexistent"]);
    let err = defaults().check(&weaker).unwrap_err().to_string();
    assert!(
        err.contains("container app: /proc/acpi not masked"),
        "{err}"
    );
    assert!(
        err.contains("/proc/kcore not masked") && err.contains("/proc/sys not read-only"),
        "{err}"
    );
    assert!(err.contains("--allow unmasked-proc"), "{err}");
    let mut allowed = defaults();
    allowed.widen(&["unmasked-proc".into()], &[]).unwrap();
    allowed.check(&weaker).unwrap();
}

#[test]
fn sysctls_outside_the_list_are_refused_by_name() {
    let p = pod(serde_json::json!({"linux": {"sysctls": {
        "net.ipv4.ip_local_port_range": "20000 30000",
        "net/core/somaxconn": "1000",
        "kernel.msgmax": "100"
    }}}));
    let reqs = requests(&p, &[]);
    let err = defaults().check(&reqs).unwrap_err().to_string();
    assert!(
        err.contains("pod: sysctl net.core.somaxconn=1000 [sysctls]"),
        "{err}"
    );
    assert!(
        err.contains("pod: sysctl kernel.msgmax=100 [sysctls]"),
        "{err}"
    );
    assert!(!err.contains("ip_local_port_range"), "{err}");
    assert!(err.contains("--allow sysctls"), "{err}");
    let mut wider = defaults();
    wider.sysctls.push("net.core.*".into());
    wider.sysctls.push("kernel.msgmax".into());
    wider.check(&reqs).unwrap();
    let mut by_flag = defaults();
    by_flag.widen(&["sysctls".into()], &[]).unwrap();
    by_flag.check(&reqs).unwrap();
}

#[test]
fn every_widening_item_is_listed_and_flags_allow_them() {
    let p = pod(serde_json::json!({
        "linux": {"cgroup_parent": "/system.slice",
                  "security_context": {"privileged": true,
                                       "namespace_options": {"pid": 2, "network": 2}}}
    }));
    let c = container(serde_json::json!({
        "metadata": {"name": "app"},
        "mounts": [{"container_path": "/host", "host_path": "/"},
                   {"container_path": "/x", "host_path": "/var/lib/kubelet/pods/../../../etc"}],
        "devices": [{"container_path": "/dev/sda", "host_path": "/dev/sda"}],
        "linux": {"security_context": {
            "privileged": true,
            "capabilities": {"add_capabilities": ["SYS_ADMIN", "CHOWN"]},
            "seccomp": {"profile_type": 1},
            "apparmor_profile": "unconfined"}}
    }));
    let reqs = requests(&p, &[("app".into(), c)]);
    let err = defaults().check(&reqs).unwrap_err().to_string();
    for want in [
        "pod: privileged mode",
        "pod: the node's PID namespace",
        "pod: the node's network namespace",
        "pod: cgroup parent /system.slice",
        "container app: privileged mode",
        "added capabilities SYS_ADMIN",
        "no seccomp filter",
        "no AppArmor profile",
        "host path / mounted at /host",
        "host path /var/lib/kubelet/pods/../../../etc",
        "host device /dev/sda",
        "--allow-host-path /",
    ] {
        assert!(err.contains(want), "{want:?} missing in:\n{err}");
    }
    assert!(!err.contains("CHOWN"), "{err}");
    let mut p = defaults();
    p.widen(
        &["privileged,host-namespaces".into(), "capabilities".into()],
        &[PathBuf::from("/")],
    )
    .unwrap();
    let err = p.check(&reqs).unwrap_err().to_string();
    assert!(!err.contains("privileged mode"), "{err}");
    assert!(!err.contains("host path"), "{err}");
    assert!(err.contains("cgroup parent"), "{err}");
    p.widen(
        &["cgroup-parent,devices,seccomp-unconfined,apparmor-unconfined".into()],
        &[],
    )
    .unwrap();
    p.check(&reqs).unwrap();
    assert!(p.widen(&["everything".into()], &[]).is_err());
}

#[test]
fn a_policy_file_is_strict() {
    let dir = std::env::temp_dir().join(format!("stasis-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("p.json");
    std::fs::write(
        &f,
        r#"{"allow": ["devices"], "host_path_prefixes": ["/srv/volumes"]}"#,
    )
    .unwrap();
    let p = Policy::load(Some(&f)).unwrap();
    assert!(p.allow.contains(&Item::Devices));
    assert_eq!(p.cgroup_roots, default_cgroup_roots());
    std::fs::write(&f, r#"{"alow": []}"#).unwrap();
    assert!(Policy::load(Some(&f)).is_err());
    std::fs::write(&f, r#"{"host_path_prefixes": ["srv"]}"#).unwrap();
    assert!(Policy::load(Some(&f)).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
