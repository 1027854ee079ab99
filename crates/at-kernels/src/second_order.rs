//! Second-order gradients in candle 0.11, and the one thread of the process that has them.
//!
//! candle keeps a gradient differentiable (the graph of `backward` itself recorded) only when the
//! environment variable `CANDLE_GRAD_DO_NOT_DETACH` is set, and reads it once per thread, at the
//! thread's first `backward`. Without it a second `backward` through a gradient is silently
//! wrong; with it every `backward` keeps its whole graph alive (several times the memory), so it
//! must not be on for ordinary training.
//!
//! Writing the environment is sound only while no other thread can read it (a `getenv` in C
//! code does not take Rust's lock), so it happens once, before any other thread exists:
//! [`SecondOrder::start`], the first thing `main` does (and every test binary that needs it,
//! which runs without libtest's threads: see [`run_tests`]). It refuses to run when the process
//! already has other threads (counted where the platform tells: Linux), sets the variable,
//! starts its worker thread, whose first `backward` reads it, and removes it again while the
//! worker waits. From then on [`SecondOrder::run`] runs closures on that worker; every other
//! thread keeps detached gradients.
//!
//! [`is_second_order_thread`] is the workspace's one answer to "does `backward` on this thread
//! keep its graph": the kernels ask it to decide between their fast backward (which builds no
//! graph) and candle's differentiable ops, and at-losses to refuse a double backpropagation that
//! would be wrong.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{Device, Result, Var, bail};

/// The variable candle 0.11 reads.
pub const VARIABLE: &str = "CANDLE_GRAD_DO_NOT_DETACH";

thread_local! {
    static SECOND_ORDER: Cell<Option<bool>> = const { Cell::new(None) };
    static IS_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Whether `backward` on this thread returns gradients that can be differentiated again.
///
/// Probed once per thread with `y = (2x)^3`: candle computes `dy/dx` from the gradient arriving
/// at `2x`, which has lost its graph when gradients are detached, so `dy/dx` then has no
/// derivative with respect to `x`. The probe is itself the thread's first `backward` if nothing
/// ran one before, which fixes the thread's setting; that is harmless, since the setting comes
/// from the environment, which only [`SecondOrder::start`] changes. If the probe fails (it
/// never has), the answer is `true`: the kernels then take candle's differentiable ops, slower
/// but never wrong.
pub fn is_second_order_thread() -> bool {
    SECOND_ORDER.with(|cell| {
        *cell.get().get_or_insert_with(|| {
            let probe = || -> Result<bool> {
                let x = Var::new(1f32, &Device::Cpu)?;
                let grads = (x.as_tensor() * 2.0)?.powf(3.0)?.backward()?;
                let dx = grads.get(&x).expect("x gets a gradient");
                Ok(dx.backward()?.get(&x).is_some())
            };
            probe().unwrap_or(true)
        })
    })
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The process's second-order thread: closures given to [`run`](Self::run) execute on it, with
/// candle's gradients differentiable. Start it first thing in `main`; it is a handle (clones
/// share the thread), and dropping the last one stops the thread.
#[derive(Clone, Debug)]
pub struct SecondOrder(Arc<Worker>);

#[derive(Debug)]
struct Worker {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Option<JoinHandle<()>>,
}

impl SecondOrder {
    /// Starts the worker. Must be called while the calling thread is the process's only one
    /// (first thing in `main`): it writes the environment, which is unsound while another
    /// thread may read it. Returns an error, and writes nothing, where it can see other threads.
    pub fn start() -> Result<Self> {
        if let Some(n) = thread_count()
            && n > 1
        {
            bail!(
                "SecondOrder::start must run while the process has one thread, found {n}: call \
                 it first in main (a test binary that needs it sets `harness = false` and uses \
                 at_kernels::second_order::run_tests)"
            )
        }
        let already_set = std::env::var_os(VARIABLE).is_some();
        if !already_set {
            // SAFETY: this is the process's only thread (checked above where the platform tells,
            // and the documented precondition elsewhere), so nothing reads the environment
            // concurrently.
            unsafe { std::env::set_var(VARIABLE, "1") };
        }
        let (ready_tx, ready_rx) = mpsc::channel::<bool>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let worker = std::thread::Builder::new().name("at-second-order".into()).spawn(move || {
            IS_WORKER.with(|w| w.set(true));
            // The thread's first backward: it reads the variable while it is set.
            let enabled = is_second_order_thread();
            let _ = ready_tx.send(enabled);
            // Wait, touching nothing, while the caller removes the variable.
            if go_rx.recv().is_err() {
                return;
            }
            for job in jobs_rx {
                job();
            }
        });
        let worker = match worker {
            Ok(worker) => worker,
            Err(e) => {
                if !already_set {
                    // SAFETY: the spawn failed, so this is still the only thread.
                    unsafe { std::env::remove_var(VARIABLE) };
                }
                bail!("cannot start the second-order thread: {e}")
            }
        };
        let enabled = ready_rx.recv().unwrap_or(false);
        if !already_set {
            // SAFETY: the worker is blocked in `go_rx.recv()` and reads nothing from the
            // environment until it is released below; no other thread exists.
            unsafe { std::env::remove_var(VARIABLE) };
        }
        let _ = go_tx.send(());
        let this = Self(Arc::new(Worker { jobs: Mutex::new(Some(jobs_tx)), thread: Some(worker) }));
        if !enabled {
            bail!("candle did not switch second-order gradients on for the worker thread")
        }
        Ok(this)
    }

    /// Runs `f` on the second-order thread and returns its result (a panic in `f` is resumed
    /// here). Calls wait for each other; called from the worker itself, it runs `f` directly.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        if IS_WORKER.with(|w| w.get()) {
            return f();
        }
        let (result_tx, result_rx) = mpsc::sync_channel::<std::thread::Result<T>>(1);
        let job = move || {
            let result = catch_unwind(AssertUnwindSafe(f));
            let _ = result_tx.send(result);
        };
        let job: Box<dyn FnOnce() + Send + '_> = Box::new(job);
        // SAFETY: the job may borrow from the caller's frame, and this function does not return
        // before the job is gone: `result_rx.recv()` returns once the job has sent its result
        // (after `f` has run and been dropped; what is left of the job then is the sender, which
        // borrows nothing) or once the sender is dropped, which happens only when the job has
        // been run or dropped unrun. The transmute changes only the trait object's lifetime.
        let job: Job = unsafe {
            std::mem::transmute::<Box<dyn FnOnce() + Send + '_>, Box<dyn FnOnce() + Send + 'static>>(
                job,
            )
        };
        {
            let jobs = self.0.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let sent = jobs.as_ref().map(|tx| tx.send(job));
            assert!(matches!(sent, Some(Ok(()))), "the second-order thread has stopped");
        }
        match result_rx.recv() {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) => resume_unwind(panic),
            Err(_) => panic!("the second-order thread stopped before finishing a job"),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The number of threads of this process, where the platform tells (Linux: `/proc/self/task`).
fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

/// A test binary's `main` for tests that need second-order gradients (`harness = false` in
/// `Cargo.toml`): starts [`SecondOrder`] before any other thread, then runs each `(name, test)`
/// whose name contains the first command-line argument that is not a flag (all without one)
/// and prints a line per test in libtest's words. Returns the exit code: failure if any test
/// panicked.
pub fn run_tests(tests: &[(&str, fn(&SecondOrder))]) -> std::process::ExitCode {
    let second_order = match SecondOrder::start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let selected: Vec<_> =
        tests.iter().filter(|(name, _)| filter.as_ref().is_none_or(|f| name.contains(f))).collect();
    println!("\nrunning {} tests", selected.len());
    let mut failed = vec![];
    for (name, test) in &selected {
        let outcome = catch_unwind(AssertUnwindSafe(|| test(&second_order)));
        println!("test {name} ... {}", if outcome.is_ok() { "ok" } else { "FAILED" });
        if outcome.is_err() {
            failed.push(*name);
        }
    }
    let passed = selected.len() - failed.len();
    let status = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {status}. {passed} passed; {} failed; 0 ignored; {} filtered out\n",
        failed.len(),
        tests.len() - selected.len()
    );
    if failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        for name in failed {
            println!("failed: {name}");
        }
        std::process::ExitCode::FAILURE
    }
}
