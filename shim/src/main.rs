//! Entry point: `start` and `delete` for containerd, otherwise serve as the pod's shim.

fn main() {
    let args: Vec<_> = std::env::args_os().collect();
    // The pod's pause process: must fork before anything else starts a thread.
    if args.get(1).is_some_and(|a| a == "pause") {
        stasis_shim::sandbox::pause::main();
    }
    // A pod's dead-man switch, likewise before any thread.
    if args.get(1).is_some_and(|a| a == "watchdog") {
        stasis_shim::sandbox::watchdog::main(&args);
    }
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-stasis-v2: {e}");
            std::process::exit(2);
        }
    };
    let result = if flags.version {
        println!(
            "containerd-shim-stasis-v2 {} (runtime io.containerd.stasis.v2)",
            env!("CARGO_PKG_VERSION")
        );
        Ok(())
    } else if flags.info {
        stasis_shim::bootstrap::info()
    } else {
        match flags.action.as_str() {
            "start" => stasis_shim::bootstrap::start(&flags),
            "delete" => stasis_shim::bootstrap::delete(&flags),
            "serve" => stasis_shim::bootstrap::serve(&flags),
            "" | "help" => {
                eprintln!("{}", stasis_shim::bootstrap::USAGE);
                Ok(())
            }
            other => Err(format!(
                "unknown action {other:?}\n{}",
                stasis_shim::bootstrap::USAGE
            )
            .into()),
        }
    };
    if let Err(e) = result {
        eprintln!("containerd-shim-stasis-v2: {e}");
        std::process::exit(1);
    }
}
