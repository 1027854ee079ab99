//! The attention-transfer trainer: a run described by a TOML config ([`config`]), trained with
//! the losses of at-losses and SGD ([`optim`]), observed through `metrics.jsonl`, checkpointed
//! atomically and resumable exactly ([`train`]); its evaluation and attention maps ([`maps`]);
//! and the timed training step the benchmarks and time estimates use ([`bench`]).
//!
//! A library: it opens a device only where a config names one ([`train::device`]), never touches
//! the network, installs no signal handler and draws no progress bar. What happens around a run
//! comes in as values in [`train::RunOptions`]: an [`train::Interrupt`] handle that a signal
//! handler (the `at-train` binary's) can set, an [`train::Observer`] for progress, and a resolver
//! for `hf://` weights (at-hub's).
#![deny(missing_docs)]

pub mod bench;
pub mod check;
pub mod config;
pub mod data;
pub mod init;
pub mod maps;
pub mod optim;
pub mod train;

/// This machine in words: its CPU model and core count.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// The machine of a job of `ranks` processes in words: [`machine`] (each rank's), times the
/// ranks when there are several.
pub fn job_machine(ranks: usize) -> String {
    match ranks {
        0 | 1 => machine(),
        n => format!("{} per rank x {n} ranks", machine()),
    }
}
