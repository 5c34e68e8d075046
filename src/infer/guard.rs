//! A panic in libtorch work (tch turns libtorch exceptions into panics) caught and made an
//! answer: one bad batch or chunk must not take the inference thread.

use super::messages::JobError;

/// Runs `f`; a panic (tch turns libtorch exceptions into panics) becomes its message.
pub(crate) fn caught<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "panic in libtorch".into())
    })
}

/// `caught`, as a failed job.
pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, JobError> {
    caught(f).map_err(JobError::Failed)
}
