//! A container's lifecycle: its states and the transitions between them, in one place.
//! Operations ask `State::apply` whether a step is allowed; the answer never depends on
//! which backend runs the container.

use std::path::PathBuf;

use containerd_shim_protos::api::Status;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// The runtime created it; Start runs it.
    Created,
    /// Created from a checkpoint, no process yet; Start restores it from `image`.
    Restorable {
        image: PathBuf,
    },
    Running,
    /// Restored from a pod checkpoint and held frozen until the pod's FinishRestore, so that
    /// no container of a pod being restored runs before all are back.
    Held,
    /// Paused by the user.
    Paused,
    /// Its init process exited.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Start,
    /// The processes came back from the images; `held` if they wait for FinishRestore.
    Restore {
        held: bool,
    },
    Pause,
    Resume,
    /// FinishRestore let a held container run.
    Release,
    /// The init process exited (possible in any state).
    Exit,
}

impl State {
    /// The state as containerd's Task API reports it.
    pub fn status(&self) -> Status {
        match self {
            State::Created | State::Restorable { .. } => Status::CREATED,
            State::Running | State::Held => Status::RUNNING,
            State::Paused => Status::PAUSED,
            State::Stopped => Status::STOPPED,
        }
    }

    /// The state after `t`, or why `t` is not allowed now.
    pub fn apply(&self, t: Transition) -> Result<State, String> {
        use State::*;
        use Transition as T;
        Ok(match (self, t) {
            (_, T::Exit) => Stopped,
            (Created, T::Start) => Running,
            (Restorable { .. }, T::Restore { held: false }) => Running,
            (Restorable { .. }, T::Restore { held: true }) => Held,
            (Running, T::Pause) => Paused,
            (Paused, T::Resume) => Running,
            (Held, T::Release) => Running,
            (state, t) => return Err(refusal(state, t)),
        })
    }

    /// Whether a checkpoint may capture it (running or paused: its processes exist).
    pub fn can_checkpoint(&self) -> bool {
        matches!(self, State::Running | State::Paused)
    }

    /// Whether Delete may remove it: its processes must be gone or never have run.
    pub fn can_delete(&self) -> bool {
        matches!(
            self,
            State::Created | State::Restorable { .. } | State::Stopped
        )
    }

    /// Whether an exec may start in it.
    pub fn can_exec(&self) -> bool {
        matches!(self, State::Running)
    }

    /// Whether its init process exists on the host (something to signal or wait for).
    pub fn has_process(&self) -> bool {
        !matches!(self, State::Restorable { .. } | State::Stopped)
    }

    fn name(&self) -> &'static str {
        match self {
            State::Created => "CREATED",
            State::Restorable { .. } => "CREATED (to be restored)",
            State::Running => "RUNNING",
            State::Held => "RUNNING (held until its pod is restored)",
            State::Paused => "PAUSED",
            State::Stopped => "STOPPED",
        }
    }
}

fn refusal(state: &State, t: Transition) -> String {
    let what = match t {
        Transition::Start => "start",
        Transition::Restore { .. } => "restore",
        Transition::Pause => "pause",
        Transition::Resume => "resume",
        Transition::Release => "release",
        Transition::Exit => "exit",
    };
    format!("cannot {what} a container that is {}", state.name())
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_transitions() {
        let image = State::Restorable {
            image: "/ckpt".into(),
        };
        assert_eq!(State::Created.apply(Transition::Start), Ok(State::Running));
        assert_eq!(
            image.apply(Transition::Restore { held: true }),
            Ok(State::Held)
        );
        assert_eq!(
            image.apply(Transition::Restore { held: false }),
            Ok(State::Running)
        );
        assert_eq!(State::Held.apply(Transition::Release), Ok(State::Running));
        assert_eq!(State::Running.apply(Transition::Pause), Ok(State::Paused));
        assert_eq!(State::Paused.apply(Transition::Resume), Ok(State::Running));
        for s in [
            State::Created,
            State::Running,
            State::Held,
            State::Paused,
            image.clone(),
        ] {
            assert_eq!(s.apply(Transition::Exit), Ok(State::Stopped));
        }
    }

    #[test]
    fn refused_transitions_say_why() {
        let e = State::Running.apply(Transition::Start).unwrap_err();
        assert_eq!(e, "cannot start a container that is RUNNING");
        assert!(State::Created
            .apply(Transition::Restore { held: false })
            .is_err());
        assert!(State::Held.apply(Transition::Pause).is_err());
        assert!(State::Paused.apply(Transition::Pause).is_err());
        assert!(State::Stopped.apply(Transition::Resume).is_err());
        assert!(State::Running.apply(Transition::Release).is_err());
    }

    #[test]
    fn status_and_guards() {
        assert_eq!(State::Held.status(), Status::RUNNING);
        assert_eq!(
            State::Restorable { image: "/x".into() }.status(),
            Status::CREATED
        );
        assert!(!State::Held.can_checkpoint());
        assert!(State::Paused.can_checkpoint());
        assert!(!State::Running.can_delete() && !State::Held.can_delete());
        assert!(State::Stopped.can_delete());
        assert!(!State::Paused.can_exec());
    }
}
