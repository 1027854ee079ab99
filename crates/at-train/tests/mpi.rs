//! Data-parallel training with real processes under `mpirun` (Open MPI), on the CPU: built and
//! run with the `mpi` feature only (`cargo test -p at-train --features mpi --test mpi`, which
//! `.ci/run` does), since it needs Open MPI installed.
//!
//! Each check compares the weights of a run under `mpirun -np 2` or `-np 3` with a reference in
//! one process: the whole batch at once for networks without batch norm (the ranks' gradients,
//! weighted by their share, are the batch's), the same parts one after the other for networks
//! with it (each part's own batch statistics, as in DDP).
#![cfg(feature = "mpi")]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use at_trainer::train::{Parallel, RunOptions};

const BIN: &str = env!("CARGO_BIN_EXE_at-train");

/// A tiny run of the quick preset: `batches` batches of 64 per epoch, one loader thread.
fn sets(student: &str, epochs: usize, batches: usize) -> Vec<String> {
    [
        format!("student={student}"),
        format!("epochs={epochs}"),
        format!("data.train_limit={}", 64 * batches),
        "data.test_limit=64".into(),
        "threads=1".into(),
        "optim.weight_decay=0.0005".into(),
        // Small enough that the networks without batch norm train smoothly, so that rounding
        // differences stay rounding differences.
        "optim.lr=0.01".into(),
    ]
    .to_vec()
}

fn set_args(sets: &[String]) -> Vec<String> {
    sets.iter().flat_map(|s| ["--set".to_owned(), s.clone()]).collect()
}

/// `mpirun` with Open MPI's run-as-root consent (CI runs as root) and more ranks than cores
/// allowed; `args` are mpirun's (an MPMD `:` included).
fn mpirun_command(args: &[String]) -> Command {
    let mut command = Command::new("mpirun");
    command
        .args(["--oversubscribe", "--bind-to", "none"])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    command
}

/// [`mpirun_command`] run to its end.
fn mpirun(args: &[String]) -> Output {
    mpirun_command(args).output().expect("mpirun runs (Open MPI's openmpi-bin installed)")
}

/// `-np ranks` followed by `args`: one program of an mpirun command line.
fn ranks_of(ranks: usize, args: Vec<String>) -> Vec<String> {
    [vec!["-np".to_owned(), ranks.to_string()], args].concat()
}

/// `at-train train` of the quick preset with `sets` into `dir`, then `extra`.
fn train_args(sets: &[String], dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [BIN, "train", "--preset", "quick"].map(String::from).to_vec();
    args.extend(set_args(sets));
    args.extend(["--run-dir".into(), dir.to_str().unwrap().into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// [`train_args`] under `mpirun -np ranks`, or alone for `ranks == 0`; it must succeed.
fn train(ranks: usize, sets: &[String], dir: &Path, extra: &[&str]) {
    let args = train_args(sets, dir, extra);
    let out = if ranks == 0 {
        Command::new(&args[0]).args(&args[1..]).output().unwrap()
    } else {
        mpirun(&ranks_of(ranks, args))
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `at-train train --resume dir` under `mpirun -np ranks`; it must succeed.
fn resume(ranks: usize, dir: &Path) {
    let args = [BIN, "train", "--resume", dir.to_str().unwrap()].map(String::from).to_vec();
    let out = mpirun(&ranks_of(ranks, args));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The reference in this process: one rank (`at_dist::Solo`) running `parts` parts of each
/// batch one after the other.
fn train_in_parts(parts: usize, sets: &[String], dir: &Path) {
    let config = at_trainer::config::resolve(None, Some("quick"), sets).unwrap();
    let parallel = Parallel { world: Arc::new(at_dist::Solo), local_parts: parts };
    let options = RunOptions { parallel: Some(parallel), ..RunOptions::default() };
    at_trainer::train::train(&config, dir, &options).unwrap();
}

fn weights(dir: &Path) -> HashMap<String, Vec<f32>> {
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    tensors
        .into_iter()
        .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// The largest difference between the two runs' weights, relative to the weight's size (at
/// least 1), and the largest change any weight went through in training (so that a check
/// can tell agreement from two runs that did nothing).
fn difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (name, x) in &a {
        for (u, v) in x.iter().zip(&b[name]) {
            worst = worst.max((u - v).abs() / u.abs().max(1.0));
        }
    }
    worst
}

/// Float rounding of sums taken in another order, over a few SGD steps.
const TOLERANCE: f32 = 2e-4;

#[test]
fn two_and_three_ranks_train_nin_without_batch_norm_as_one_process_on_the_whole_batch() {
    let root = tempfile::tempdir().unwrap();
    let sets = sets("nin-thin-nobn", 2, 3);
    train(0, &sets, &root.path().join("one"), &[]);
    for ranks in [2, 3] {
        let dir = root.path().join(format!("ranks-{ranks}"));
        train(ranks, &sets, &dir, &[]);
        let d = difference(&root.path().join("one"), &dir);
        assert!(d < TOLERANCE, "{ranks} ranks: {d}");
        // Rank 0 alone wrote: one line per epoch.
        let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 2, "{metrics}");
    }
}

#[test]
fn with_batch_norm_ranks_train_as_one_process_that_runs_each_part_and_sums() {
    let root = tempfile::tempdir().unwrap();
    let sets = sets("wrn-16-1", 1, 3);
    for ranks in [2, 3] {
        let reference = root.path().join(format!("parts-{ranks}"));
        train_in_parts(ranks, &sets, &reference);
        let dir = root.path().join(format!("ranks-{ranks}"));
        train(ranks, &sets, &dir, &[]);
        let d = difference(&reference, &dir);
        assert!(d < TOLERANCE, "{ranks} ranks: {d}");
    }
    // And the parts do change the result (batch statistics per part): the check above is not
    // vacuous.
    let whole = root.path().join("whole");
    train_in_parts(1, &sets, &whole);
    assert!(difference(&whole, &root.path().join("parts-2")) > 1e-4);
}

#[test]
fn distillation_and_attention_transfer_with_a_teacher_train_as_one_process() {
    let root = tempfile::tempdir().unwrap();
    let teacher = root.path().join("teacher");
    train(0, &sets("nin-wide-nobn", 1, 2), &teacher, &[]);
    let mut student = sets("nin-thin-nobn", 1, 3);
    student.extend([
        format!(
            "teacher={{model = \"nin-wide-nobn\", checkpoint = \"{}\"}}",
            teacher.join("model.safetensors").display()
        ),
        "loss.alpha=0.9".into(),
        "loss.beta=1000".into(),
    ]);
    train(0, &student, &root.path().join("one"), &[]);
    train(2, &student, &root.path().join("two"), &[]);
    let d = difference(&root.path().join("one"), &root.path().join("two"));
    assert!(d < TOLERANCE, "{d}");
    let metrics = std::fs::read_to_string(root.path().join("two/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"train_kd\":") && !metrics.contains("\"train_at\":[]"), "{metrics}");
}

#[test]
fn stopped_mid_epoch_and_resumed_with_another_number_of_ranks_ends_as_uninterrupted() {
    let root = tempfile::tempdir().unwrap();
    let sets = sets("nin-thin-nobn", 2, 6);
    train(0, &sets, &root.path().join("straight"), &[]);
    let dir = root.path().join("stopped");
    train(2, &sets, &dir, &["--stop-after-batches", "4"]);
    assert!(!dir.join("model.safetensors").exists(), "stopped mid-epoch");
    let tag = std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap();
    assert_eq!(tag.trim(), "epoch-0000-batch-00004");
    resume(3, &dir);
    let d = difference(&root.path().join("straight"), &dir);
    assert!(d < TOLERANCE, "{d}");
}

#[test]
fn a_config_that_differs_between_ranks_is_refused_before_any_step() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r");
    let rank = |seed: u32| -> Vec<String> {
        let mut sets = sets("nin-thin-nobn", 1, 2);
        sets.push(format!("seed={seed}"));
        ranks_of(1, train_args(&sets, &dir, &[]))
    };
    let out = mpirun(&[rank(1), vec![":".into()], rank(2)].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("config differs from rank 0's"), "{stderr}");
    assert!(!dir.join("metrics.jsonl").exists(), "no step was taken");
}

#[test]
fn a_rank_that_fails_alone_ends_every_rank_with_its_message() {
    let root = tempfile::tempdir().unwrap();
    let trained = root.path().join("trained");
    let sets_ = sets("nin-thin-nobn", 1, 2);
    train(0, &sets_, &trained, &[]);
    // The same relative path names a file in rank 0's directory and nothing in rank 1's.
    let (here, there) = (root.path().join("here"), root.path().join("there"));
    std::fs::create_dir_all(&here).unwrap();
    std::fs::create_dir_all(&there).unwrap();
    std::fs::copy(trained.join("model.safetensors"), here.join("start.safetensors")).unwrap();
    let dir = root.path().join("r");
    let mut start = sets_.clone();
    start.push("pretrained=start.safetensors".into());
    let rank = |wdir: &Path| -> Vec<String> {
        let wdir = vec!["-wdir".to_owned(), wdir.to_str().unwrap().into()];
        ranks_of(1, [wdir, train_args(&start, &dir, &[])].concat())
    };
    let started = Instant::now();
    let out = mpirun(&[rank(&here), vec![":".into()], rank(&there)].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 of 2") && stderr.contains("start.safetensors"), "{stderr}");
    assert!(started.elapsed().as_secs() < 60, "every rank ended: {:?}", started.elapsed());
}

/// Ctrl-C to `mpirun` (which forwards it to every rank) mid-epoch: every rank stops after the
/// same batch, rank 0 checkpoints, and the run resumed under as many ranks ends with exactly
/// the weights of an uninterrupted run (bit for bit: the same sums in the same order; under
/// another number of ranks the rounding differs, which the test above checks on a short run,
/// since over tens of steps of a network without batch norm it grows past 1e-4).
#[test]
fn interrupted_through_mpirun_and_resumed_ends_exactly_as_uninterrupted() {
    let root = tempfile::tempdir().unwrap();
    let sets = sets("nin-thin-nobn", 2, 24);
    let dir = root.path().join("r");
    let child = mpirun_command(&ranks_of(2, train_args(&sets, &dir, &[])))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    once_begun(&dir);
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!dir.join("model.safetensors").exists(), "stopped before the end: {stderr}");
    let tag = std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap();
    // Almost always mid-epoch (the signal comes 1.5 s into epochs of seconds); at an epoch's
    // end the check below holds as well.
    assert!(tag.starts_with("epoch-000"), "{tag} {stderr}");
    resume(2, &dir);
    train(2, &sets, &root.path().join("straight"), &[]);
    assert_eq!(weights(&root.path().join("straight")), weights(&dir), "bit for bit");
}

/// A loss that is not finite stops every rank at the same read of the (global) metric sums,
/// each saying why, instead of one rank leaving the others waiting.
#[test]
fn a_nan_loss_stops_every_rank_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    let mut sets = sets("nin-thin-nobn", 1, 6);
    sets.push("optim.lr=1e12".into());
    let dir = root.path().join("r");
    let started = Instant::now();
    let out = mpirun(&ranks_of(2, train_args(&sets, &dir, &[])));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("not finite"), "{stderr}");
    assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
    assert!(!dir.join("model.safetensors").exists());
}

/// `kill -9` of every rank (a crash: no handler runs), as a failed node does.
fn kill_ranks(mpirun: &std::process::Child) {
    let pid = mpirun.id().to_string();
    let killed = Command::new("pkill").args(["-KILL", "-P", &pid]).status().unwrap();
    assert!(killed.success(), "no rank of mpirun {pid} to kill");
}

/// `command` started, its stderr going to `log`.
fn spawn_logged(mut command: Command, log: &Path) -> std::process::Child {
    let file = std::fs::File::create(log).unwrap();
    command.stdout(Stdio::null()).stderr(file).spawn().unwrap()
}

/// `child` waited for within `limit` of `started`, with its stderr from `log`; past the limit
/// its ranks are killed and the test fails (mismatched collectives hang rather than fail).
fn wait_within(
    mut child: std::process::Child,
    (started, limit): (Instant, Duration),
    log: &Path,
) -> (ExitStatus, String) {
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, read());
        }
        if started.elapsed() > limit {
            kill_ranks(&child);
            let _ = child.wait();
            panic!("still running after {limit:?}: {}", read());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `command` run to its end within `limit` (see [`wait_within`]).
fn run_within(command: Command, limit: Duration, log: &Path) -> (ExitStatus, String) {
    let started = Instant::now();
    wait_within(spawn_logged(command, log), (started, limit), log)
}

/// Waits until the run in `dir` has begun (its config is written), and 1.5 s more: well into
/// its first epoch, which lasts seconds.
fn once_begun(dir: &Path) {
    let started = Instant::now();
    while !dir.join("config.toml").exists() && started.elapsed().as_secs() < 60 {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
}

/// A checkpoint inside an epoch is collective (rank 0's batch-norm statistics go to every
/// rank), and each rank's clock passes the interval after its own batch: the ranks agree on
/// when. Here rank 0's interval passes after every batch and rank 1's never; the job still
/// ends, with the weights and the evaluation of a job that took no checkpoint inside the
/// epoch. (Unagreed, Open MPI matched rank 0's early broadcasts with rank 1's at the
/// evaluation, which then ran on stale statistics; NCCL matches collectives in order, so
/// there a broadcast would meet an all-reduce.)
#[test]
fn ranks_whose_checkpoint_clocks_differ_checkpoint_after_the_same_batch() {
    let root = tempfile::tempdir().unwrap();
    let sets = sets("wrn-16-1", 1, 4);
    let plain = root.path().join("plain");
    train(2, &sets, &plain, &[]);
    let dir = root.path().join("r");
    let rank = |extra: &[&str]| ranks_of(1, train_args(&sets, &dir, extra));
    let every_batch = rank(&["--checkpoint-minutes", "1e-6"]);
    let args = [every_batch, vec![":".into()], rank(&[])].concat();
    let log = root.path().join("stderr.txt");
    let (status, stderr) = run_within(mpirun_command(&args), Duration::from_secs(120), &log);
    assert!(status.success(), "{stderr}");
    assert_eq!(weights(&plain), weights(&dir), "bit for bit");
    let evaluation = |dir: &Path| -> Vec<(f64, f64)> {
        let metrics = at_trainer::train::read_metrics(dir).unwrap();
        metrics.iter().map(|m| (m.test_loss, m.test_top1)).collect()
    };
    assert_eq!(evaluation(&plain), evaluation(&dir));
}

/// Every rank killed mid-epoch (no checkpoint on the way out), and the run resumed under
/// another number of ranks from its last timed checkpoint: the weights of an uninterrupted run.
#[test]
fn killed_mid_epoch_and_resumed_with_another_number_of_ranks_ends_as_uninterrupted() {
    let root = tempfile::tempdir().unwrap();
    let sets = sets("nin-thin-nobn", 2, 6);
    train(0, &sets, &root.path().join("straight"), &[]);
    let dir = root.path().join("killed");
    let args = ranks_of(2, train_args(&sets, &dir, &["--checkpoint-minutes", "1e-6"]));
    let mut child =
        mpirun_command(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Killed once a checkpoint two batches into the first epoch is down.
    let latest = dir.join("checkpoints/latest");
    let started = Instant::now();
    let past_two = |tag: &str| tag.trim() >= "epoch-0000-batch-00002";
    while !std::fs::read_to_string(&latest).is_ok_and(|t| past_two(&t)) {
        assert!(started.elapsed().as_secs() < 120, "no checkpoint two batches in");
        std::thread::sleep(Duration::from_millis(5));
    }
    kill_ranks(&child);
    assert!(!child.wait().unwrap().success());
    assert!(!dir.join("model.safetensors").exists(), "killed before the end");
    resume(3, &dir);
    let d = difference(&root.path().join("straight"), &dir);
    assert!(d < TOLERANCE, "{d}");
}

/// Ctrl-C that reaches one rank alone (a signal to rank 1's process, not through mpirun): the
/// ranks agree on it after each batch, so every rank stops after the same one (none is left
/// waiting in a collective) and rank 0 writes the checkpoint, which resumes to the end.
#[test]
fn an_interrupt_on_one_rank_alone_stops_every_rank_with_a_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let sets = sets("nin-thin-nobn", 2, 24);
    let dir = root.path().join("r");
    let log = root.path().join("stderr.txt");
    let started = Instant::now();
    let child = spawn_logged(mpirun_command(&ranks_of(2, train_args(&sets, &dir, &[]))), &log);
    once_begun(&dir);
    let rank_1 = rank_process(&child, 1);
    let kill = Command::new("kill").args(["-INT", &rank_1.to_string()]).status().unwrap();
    assert!(kill.success());
    let (status, stderr) = wait_within(child, (started, Duration::from_secs(120)), &log);
    assert!(status.success(), "{stderr}");
    assert!(!dir.join("model.safetensors").exists(), "stopped before the end: {stderr}");
    assert!(dir.join("checkpoints/latest").exists(), "{stderr}");
    resume(2, &dir);
    assert!(dir.join("model.safetensors").exists());
}

/// The process id of rank `rank` among `mpirun`'s children (Open MPI gives each its rank in
/// `OMPI_COMM_WORLD_RANK`).
fn rank_process(mpirun: &std::process::Child, rank: usize) -> u32 {
    let children = Command::new("pgrep").args(["-P", &mpirun.id().to_string()]).output().unwrap();
    let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
    String::from_utf8_lossy(&children.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse::<u32>().ok())
        .find(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            environ.split(|&b| b == 0).any(|var| var == wanted.as_bytes())
        })
        .unwrap_or_else(|| panic!("no rank {rank} among mpirun {}'s children", mpirun.id()))
}
