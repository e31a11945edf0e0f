//! How a container's process is started: libcontainer's default executor,
//! with the signal disposition a process expects.
//!
//! `migrun`'s commands that change containers ignore SIGPIPE, so that a
//! hook which exits without reading the state on its stdin is an EPIPE,
//! not the death of migrun half-way through a create. An ignored signal
//! stays ignored across `execve`, and a container's processes are clones
//! of the runtime: without this executor, `yes | head` in a container would
//! never end. runc's container processes start with SIGPIPE at its
//! default; so do migrun's, whatever the program that links this library
//! does with it.

use std::collections::HashMap;

use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use oci_spec::runtime::Spec;

/// libcontainer's default executor, which first puts SIGPIPE back to its
/// default disposition. Runs in the container's init (or exec) process,
/// after the startContainer hooks and right before the `execve`.
#[derive(Clone, Default)]
pub struct DefaultSignals;

impl Executor for DefaultSignals {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        // SAFETY: setting a disposition to SIG_DFL has no preconditions; this
        // process is single-threaded here and about to call execve.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
        libcontainer::workload::default::get_executor().exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        libcontainer::workload::default::get_executor().setup_envs(envs)
    }
}
