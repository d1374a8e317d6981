//! The files a checkpoint captures with the memory and a restore puts back: a container's
//! writable layer (`rootfs.rs`) and the contents of named volumes (`volumes.rs`). Plain file
//! work, no runtime and no cgroups: callers run it on the blocking pool.

pub mod rootfs;
pub mod volumes;
