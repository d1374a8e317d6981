//! crun: the runc command line, checkpoint and restore through CRIU included. What differs is
//! its name in errors, its state root, and that its `checkpoint`/`restore` lack `--empty-ns`.

use std::path::PathBuf;

use super::{config::Engine, Runc};

pub fn new(binary: PathBuf, root: PathBuf, args: Vec<String>) -> Runc {
    Runc::new(binary, root)
        .with_args(args)
        .dialect(Engine::Crun, false)
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, path::Path};

    use super::*;
    use crate::runtime::{CheckpointHooks, CheckpointOpts, OciRuntime};

    /// A stand-in crun that records its arguments and fails like crun does on this host when
    /// asked to, so the backend's command lines and error handling are checked without crun.
    fn fake_crun(dir: &Path) -> PathBuf {
        let bin = dir.join("crun");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\necho \"$@\" >> {dir}/argv\n\
                 case \"$*\" in *\" state \"*) echo '{{\"status\":\"running\",\"pid\":42}}';; \
                 *\" checkpoint \"*) echo 'cgroups in hybrid mode not supported' >&2; exit 1;; esac\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    #[tokio::test]
    async fn crun_command_lines_and_errors() {
        crate::process::reaper::start().unwrap();
        let dir = std::env::temp_dir().join(format!("stasis-crun-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let crun = new(
            fake_crun(&dir),
            dir.join("root"),
            vec!["--cgroup-manager=cgroupfs".into()],
        );
        assert_eq!(crun.name(), "crun");

        let st = crun.state("c1").await.unwrap();
        assert_eq!((st.status.as_str(), st.pid), ("running", 42));

        let opts = CheckpointOpts {
            image_path: dir.join("img"),
            work_path: dir.join("work"),
            leave_running: true,
            tcp_established: true,
            ..Default::default()
        };
        let err = crun.checkpoint("c1", &opts).await.unwrap_err().to_string();
        assert!(
            err.contains("c1") && err.contains("crun checkpoint") && err.contains("hybrid mode"),
            "{err}"
        );
        let argv = std::fs::read_to_string(dir.join("argv")).unwrap();
        let root = dir.join("root");
        assert!(argv.contains(&format!(
            "--root {} --cgroup-manager=cgroupfs state c1",
            root.display()
        )));
        assert!(
            argv.contains(&format!(
                "checkpoint --image-path {} --work-path {} --tcp-established --leave-running c1",
                dir.join("img").display(),
                dir.join("work").display()
            )),
            "{argv}"
        );

        // crun has no --empty-ns: refused before crun runs, naming the container.
        let empty = CheckpointOpts {
            empty_ns: vec!["network".into()],
            ..opts
        };
        let err = crun.checkpoint("c1", &empty).await.unwrap_err().to_string();
        assert!(err.contains("c1") && err.contains("--empty-ns"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
