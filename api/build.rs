//! Generates the pod Checkpoint service (messages and async ttrpc code) from our proto.

use std::{env, fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("checkpoint");
    fs::create_dir_all(&out).unwrap();
    let proto = "proto/stasis/checkpoint/v1/checkpoint.proto";
    let events = "proto/stasis/events/v1/events.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed={events}");
    Codegen::new()
        .inputs([proto, events])
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out)
        .run()
        .expect("generate the Checkpoint service");
    // `include!` cannot take inner attributes: drop them from the generated files.
    for entry in fs::read_dir(&out).unwrap().flatten() {
        let text = fs::read_to_string(entry.path()).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect();
        fs::write(entry.path(), kept.join("\n")).unwrap();
    }
}
