//! `stasis-harness`: the test harness by hand, for debugging (`up` keeps containerd running).

use anyhow::Result;

fn main() -> Result<()> {
    let arg = std::env::args().nth(1).unwrap_or_default();
    match arg.as_str() {
        "image" => {
            let dest = std::env::args()
                .nth(2)
                .unwrap_or_else(|| "busybox.oci.tar".into());
            stasis_e2e::image::write_busybox_archive(
                std::path::Path::new(&dest),
                stasis_e2e::image::BUSYBOX_REF,
            )?;
            println!("{dest}");
        }
        "up" => {
            let c = stasis_e2e::Containerd::start("manual")?;
            c.import_busybox()?;
            println!(
                "containerd at {} (namespace {}); Ctrl-C to stop",
                c.socket().display(),
                c.namespace
            );
            let mut sigs = signal_wait();
            sigs();
        }
        _ => eprintln!("usage: stasis-harness image [DEST] | up"),
    }
    Ok(())
}

fn signal_wait() -> impl FnMut() {
    || {
        use nix::sys::signal::{SigSet, Signal};
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        set.thread_block().ok();
        let _ = set.wait();
    }
}
