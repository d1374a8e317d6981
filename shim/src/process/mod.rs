//! Processes the shim runs or adopts: the reaper that owns `waitpid`, the stdio between the
//! runtime and containerd's fifos, and the pod's PID namespace allocator.

pub mod pidns;
pub mod reaper;
pub mod stdio;
