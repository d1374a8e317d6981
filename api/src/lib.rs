pub use containerd_shim_protos as containerd;
