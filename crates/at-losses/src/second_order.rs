//! Where second-order gradients are on: the process's one second-order thread, owned by
//! at-kernels (whose kernels ask the same question) and re-exported here.
//!
//! candle 0.11 keeps gradients differentiable only on a thread that read
//! `CANDLE_GRAD_DO_NOT_DETACH` at its first `backward`. [`SecondOrder::start`], first thing in
//! `main` (it refuses once other threads exist, since it writes the environment), makes one
//! such thread; [`SecondOrder::run`] runs a closure there. Every other thread keeps detached
//! gradients and their smaller memory use. The double-backpropagation losses call
//! [`ensure_second_order`] so that they fail loudly rather than compute a wrong gradient.

use candle_core::{Result, bail};

pub use at_kernels::second_order::{SecondOrder, is_second_order_thread, run_tests};

/// An error unless second-order gradients are on for this thread.
pub fn ensure_second_order(what: &str) -> Result<()> {
    if !is_second_order_thread() {
        bail!(
            "{what} needs second-order gradients, which are off on this thread: build the loss \
             inside SecondOrder::run (at_losses::second_order::SecondOrder, started first in main)"
        )
    }
    Ok(())
}
