//! Switching candle's second-order gradients on where they are needed, and only there.
//!
//! candle 0.11 builds a differentiable gradient graph only when the environment variable
//! `CANDLE_GRAD_DO_NOT_DETACH` is set, and reads it once per thread, the first time that thread
//! runs `backward`. Without it a second `backward` through a gradient is silently wrong, and with
//! it every `backward` keeps its whole graph alive (several times the memory), so it must not be
//! on for ordinary training.
//!
//! [`with_second_order`] runs a closure on a fresh thread that reads the variable while it is set:
//! the variable is set, the thread makes its first `backward` (which fixes its setting), and the
//! variable is removed again before the closure starts, all under one lock. Threads that run
//! their first `backward` inside that short window would also see it; no thread of ours does.
//! [`second_order_enabled`] probes the current thread, and the double-backpropagation losses call
//! [`ensure_second_order`] so that they fail loudly rather than compute a wrong gradient.

use std::sync::Mutex;

use candle_core::{Device, Result, Var, bail};

const VARIABLE: &str = "CANDLE_GRAD_DO_NOT_DETACH";

/// Serialises the set/read/remove of the environment variable.
static ENV_LOCK: Mutex<()> = Mutex::new(());

/// Whether `backward` on this thread returns gradients that can be differentiated again.
///
/// Probing is itself a `backward`; it waits while [`with_second_order`] has the variable set, so
/// a thread whose first `backward` is this probe always keeps its own setting.
pub fn second_order_enabled() -> bool {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    probe()
}

/// The probe without the lock. For `y = (2x)^3`, candle computes `dy/dx` as `2 * g` where `g` is
/// the gradient arriving at `2x`; when gradients are detached `g` has lost its graph, so `dy/dx`
/// has no derivative with respect to `x`.
fn probe() -> bool {
    let run = || -> Result<bool> {
        let x = Var::new(1f32, &Device::Cpu)?;
        let grads = (x.as_tensor() * 2.0)?.powf(3.0)?.backward()?;
        let dx = grads.get(&x).expect("x gets a gradient");
        Ok(dx.backward()?.get(&x).is_some())
    };
    run().unwrap_or(false)
}

/// An error unless second-order gradients are on for this thread.
pub fn ensure_second_order(what: &str) -> Result<()> {
    if !second_order_enabled() {
        bail!(
            "{what} needs second-order gradients, which are off on this thread: \
             run it inside at_losses::second_order::with_second_order"
        )
    }
    Ok(())
}

/// Runs `f` on a new thread on which candle keeps gradients differentiable, and returns its
/// result. Other threads keep their setting.
pub fn with_second_order<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the variable is only changed under ENV_LOCK, and only candle's first backward
        // on a thread reads it.
        let previous = std::env::var_os(VARIABLE);
        unsafe { std::env::set_var(VARIABLE, "1") };
        let worker = scope.spawn(move || {
            // The first backward of this thread reads the variable while it is set.
            let enabled = probe();
            ready_tx.send(enabled).expect("the caller waits for the probe");
            go_rx.recv().expect("the caller releases the worker");
            f()
        });
        let enabled = ready_rx.recv().expect("the worker probes once");
        match previous {
            Some(value) => unsafe { std::env::set_var(VARIABLE, value) },
            None => unsafe { std::env::remove_var(VARIABLE) },
        }
        drop(guard);
        assert!(enabled, "candle did not enable second-order gradients on the worker thread");
        go_tx.send(()).expect("the worker waits");
        worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
