//! `cargo xtask bench`: the trainer's step (`crates/at-trainer/examples/step_bench.rs`) against the
//! same step in eager PyTorch (`xtask/bench/torch_step.py`), on this CPU, alternating the two.
//!
//! Each round runs every configuration once on each side (`WARMUP` untimed steps, then `STEPS`
//! timed ones, in a fresh process); the reported time is the median of every timed step of every
//! round. Writes `docs/benchmarks.json` (one entry per measurement) and the table between the
//! markers in `docs/benchmarks.md`.
//!
//! It also times the 224-pixel ResNet steps of Tables 4 and 5 (`RESNET_CONFIGS`, at batch 8 and
//! 32), written to their own table between their own markers.
//!
//! Options: `--rounds N` (default 2), `--steps N` (5), `--warmup N` (2), `--quick` (WRN-16-1
//! only), `--resnet` (the 224-pixel ResNet rows only), `--no-resnet` (without them), `--threads
//! N` (PyTorch's threads; default: every core, as rayon uses), `--avx2` (the 224-pixel rows only,
//! both sides on their AVX2 code on this CPU: `AT_KERNELS_ISA=avx2` for ours,
//! `ATEN_CPU_CAPABILITY=avx2` and `ONEDNN_MAX_CPU_ISA=AVX2` for PyTorch, so that a machine with
//! AVX-512 measures what a CPU without it runs; their own table).

use std::env;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{python, root, run};

/// (student, step, teacher)
const CONFIGS: &[(&str, &str, &str)] = &[
    ("wrn-16-1", "student", ""),
    ("wrn-16-1", "teacher", "wrn-16-2"),
    ("wrn-16-1", "at", "wrn-16-2"),
    ("wrn-16-1", "at-kd", "wrn-16-2"),
    ("wrn-16-2", "student", ""),
    ("wrn-16-2", "teacher", "wrn-40-2"),
    ("wrn-16-2", "at", "wrn-40-2"),
    ("wrn-16-2", "at-kd", "wrn-40-2"),
    ("wrn-40-2", "student", ""),
];

/// (student, step, teacher, batch): the ResNet steps of Tables 4 and 5, on 224x224 images.
const RESNET_CONFIGS: &[(&str, &str, &str, usize)] = &[
    ("resnet18", "student", "", 8),
    ("resnet18", "at", "resnet34", 8),
    ("resnet34", "student", "", 8),
    ("resnet18", "student", "", 32),
    ("resnet18", "at", "resnet34", 32),
    ("resnet34", "student", "", 32),
];
const RESNET_SIDE: usize = 224;

const BATCH: usize = 128;
const START: &str = "<!-- xtask bench: start -->";
const END: &str = "<!-- xtask bench: end -->";
const RESNET_START: &str = "<!-- xtask bench 224: start -->";
const RESNET_END: &str = "<!-- xtask bench 224: end -->";
const RESNET_AVX2_START: &str = "<!-- xtask bench 224 avx2: start -->";
const RESNET_AVX2_END: &str = "<!-- xtask bench 224 avx2: end -->";

struct Options {
    rounds: usize,
    steps: usize,
    warmup: usize,
    quick: bool,
    /// Which tables: (the CIFAR-sized one, the 224-pixel ResNets).
    tables: (bool, bool),
    threads: usize,
    /// Both sides on their AVX2 code.
    avx2: bool,
}

fn options(args: &[String]) -> Result<Options> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut o = Options {
        rounds: 2,
        steps: 5,
        warmup: 2,
        quick: false,
        tables: (true, true),
        threads: cores,
        avx2: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--rounds" => o.rounds = value("--rounds")?,
            "--steps" => o.steps = value("--steps")?,
            "--warmup" => o.warmup = value("--warmup")?,
            "--threads" => o.threads = value("--threads")?,
            "--quick" => (o.quick, o.tables.1) = (true, false),
            "--resnet" => o.tables = (false, true),
            "--no-resnet" => o.tables.1 = false,
            "--avx2" => (o.avx2, o.tables) = (true, (false, true)),
            other => bail!(
                "unknown option `{other}`: --rounds N, --steps N, --warmup N, --threads N, \
                 --quick, --resnet, --no-resnet, --avx2"
            ),
        }
    }
    if o.rounds == 0 || o.steps == 0 {
        bail!("--rounds and --steps must be at least 1")
    }
    Ok(o)
}

/// The `"ms"` list of one JSON line printed by either side.
fn times(line: &Value) -> Result<Vec<f64>> {
    let ms = line["ms"].as_array().with_context(|| format!("no \"ms\" list in `{line}`"))?;
    ms.iter().map(|v| v.as_f64().with_context(|| format!("bad time `{v}` in `{line}`"))).collect()
}

/// A string field of one JSON line.
fn field<'a>(line: &'a Value, name: &str) -> Option<&'a str> {
    line[name].as_str()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// The last JSON line a benchmark printed.
fn output(command: &mut Command) -> Result<Value> {
    let lines = json_lines(command)?;
    lines.last().cloned().with_context(|| format!("{command:?} printed no JSON line"))
}

/// Builds a benchmark example in release mode and returns its binary.
fn build_example(package: &str, example: &str) -> Result<PathBuf> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(&cargo).current_dir(root()).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        package,
        "--example",
        example,
    ]))?;
    let target =
        env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    Ok(target.join("release/examples").join(example))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let kb: f64 = s.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!(", {:.0} GiB", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_default();
    format!("{cpu}, {cores} cores{mem}")
}

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown date".into())
}

struct Row {
    model: &'static str,
    step: &'static str,
    teacher: &'static str,
    ours: f64,
    torch: f64,
}

pub(crate) fn bench(args: &[String]) -> Result<()> {
    let o = options(args)?;
    let python = python()?;
    println!("building the Rust side (release)");
    let ours_bin = build_example("at-trainer", "step_bench")?;
    let script = root().join("xtask/bench/torch_step.py");
    if o.tables.1 {
        resnet_rounds(&ours_bin, &python, &script, &o)?;
    }
    if !o.tables.0 {
        return Ok(());
    }
    let configs: Vec<_> = CONFIGS
        .iter()
        .filter(|c| !o.quick || c.0 == "wrn-16-1")
        .map(|&(model, step, teacher)| (model, step, teacher, BATCH))
        .collect();
    let (measured, torch_version) = alternate(&configs, 32, (&ours_bin, &python, &script), &o)?;
    let convs = conv_rounds(&python, &o)?;
    let rows: Vec<Row> = configs
        .iter()
        .enumerate()
        .map(|(i, &(model, step, teacher, _))| Row {
            model,
            step,
            teacher,
            ours: measured[i].ours.median(),
            torch: measured[i].torch.median(),
        })
        .collect();
    write(&rows, &convs, &o, &torch_version)
}

/// The 224-pixel ResNet rows: both sides alternating, as the CIFAR rows; their table is
/// written between its own markers.
fn resnet_rounds(
    ours_bin: &PathBuf,
    python: &PathBuf,
    script: &PathBuf,
    o: &Options,
) -> Result<()> {
    let (measured, torch_version) =
        alternate(RESNET_CONFIGS, RESNET_SIDE, (ours_bin, python, script), o)?;
    let (start, end, title, isa_note) = if o.avx2 {
        (
            RESNET_AVX2_START,
            RESNET_AVX2_END,
            "on the AVX2 paths (`cargo xtask bench --avx2`)",
            " Both sides on their AVX2 code, forced on this CPU (`AT_KERNELS_ISA=avx2`; \
             `ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`): what a CPU without AVX-512 \
             runs; the C library and the `gemm` crate (the 7x7 stem's weight gradient, about 1% \
             of our step) still choose their AVX-512 code.",
        )
    } else {
        (RESNET_START, RESNET_END, "(`cargo xtask bench`)", "")
    };
    let mut table = format!(
        "{start}\n## Training step at 224x224: the ResNets of Tables 4 and 5 {title}\n\n\
         Machine: {}. Date: {}.{isa_note} PyTorch {torch_version} (eager, {} threads; \
         torchvision's ResNets, 10 classes) against our release build, random 224x224 input, \
         SGD with momentum and weight decay; AT on the first three groups, beta 1e3. Median over {} rounds of {} timed \
         steps each (after {} untimed), alternating. `speedup` = torch / ours: above 1 we are \
         faster. `rounds` gives each round's median, ours / PyTorch: where the two sides' rounds \
         overlap, the difference is within this machine's noise (`~` after the speedup says \
         so). Peak memory: each process's largest resident size (`VmHWM`, `ru_maxrss`), the \
         largest over the rounds.\n\n\
         | student | step | teacher | batch | ours (ms) | PyTorch (ms) | speedup | rounds (ms) | ours peak (MB) | PyTorch peak (MB) |\n\
         |---|---|---|---:|---:|---:|---:|---|---:|---:|\n",
        machine(),
        today(),
        o.threads,
        o.rounds,
        o.steps,
        o.warmup
    );
    for (i, &(model, step, teacher, batch)) in RESNET_CONFIGS.iter().enumerate() {
        let m = &measured[i];
        let (a, b) = (m.ours.median(), m.torch.median());
        let (ours, torch) = (m.ours.round_medians(), m.torch.round_medians());
        let list = |v: &[f64]| v.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(", ");
        table.push_str(&format!(
            "| {model} | {step} | {} | {batch} | {a:.0} | {b:.0} | {:.2}{} | {} / {} | {} | {} |\n",
            if teacher.is_empty() { "-" } else { teacher },
            b / a,
            if within_noise(&ours, &torch) { " ~" } else { "" },
            list(&ours),
            list(&torch),
            m.ours.peak / 1024,
            m.torch.peak / 1024
        ));
    }
    table.push_str(end);
    let path = replace_section(&table, (start, end))?;
    println!("written: {}", path.display());
    Ok(())
}

/// Whether the two sides' round medians overlap (the lowest of each at or below the highest of
/// the other), so that which side is faster could change from one round to the next.
fn within_noise(ours: &[f64], torch: &[f64]) -> bool {
    let max = |v: &[f64]| v.iter().copied().fold(f64::MIN, f64::max);
    let min = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    !ours.is_empty() && !torch.is_empty() && min(ours) <= max(torch) && min(torch) <= max(ours)
}

/// One configuration's measurements over the rounds, per side.
#[derive(Clone, Default)]
struct Measured {
    ours: Side,
    torch: Side,
}

/// One side's step times (ms), round by round, and its largest peak resident size (KiB).
#[derive(Clone, Default)]
struct Side {
    rounds: Vec<Vec<f64>>,
    peak: u64,
}

impl Side {
    /// Adds one round: the times and peak of the JSON line the side printed.
    fn add(&mut self, (line, peak): &(Value, u64), what: &str) -> Result<()> {
        self.rounds.push(times(line).context(what.to_owned())?);
        self.peak = self.peak.max(*peak);
        Ok(())
    }

    /// The median of every timed step of every round so far.
    fn median(&self) -> f64 {
        median(&mut self.rounds.concat())
    }

    fn round_medians(&self) -> Vec<f64> {
        self.rounds.iter().map(|r| median(&mut r.clone())).collect()
    }
}

/// Runs every `(student, step, teacher, batch)` on `side`-pixel images on both sides, one fresh
/// process each, alternating, `o.rounds` times; returns each configuration's measurements and
/// PyTorch's version.
fn alternate(
    configs: &[(&str, &str, &str, usize)],
    side: usize,
    (ours_bin, python, script): (&PathBuf, &PathBuf, &PathBuf),
    o: &Options,
) -> Result<(Vec<Measured>, String)> {
    let mut measured = vec![Measured::default(); configs.len()];
    let mut torch_version = String::new();
    let (warmup, steps, side) = (o.warmup.to_string(), o.steps.to_string(), side.to_string());
    for round in 1..=o.rounds {
        for (m, &(model, step, teacher, batch)) in measured.iter_mut().zip(configs) {
            let teacher_arg = if teacher.is_empty() { "none" } else { teacher };
            let batch = batch.to_string();
            let common = [model, step, teacher_arg, &batch, &warmup, &steps];
            let mut ours = Command::new(ours_bin);
            let mut torch = Command::new(python);
            if o.avx2 {
                ours.env("AT_KERNELS_ISA", "avx2");
                torch.env("ATEN_CPU_CAPABILITY", "avx2").env("ONEDNN_MAX_CPU_ISA", "AVX2");
            }
            let line = output_with_peak(ours.args(common).arg(&side))?;
            check_isa(&line.0, o, "avx2")?;
            m.ours.add(&line, "ours")?;
            let torch_args = [o.threads.to_string(), "cpu".into(), side.clone()];
            let line = output_with_peak(torch.arg(script).args(common).args(torch_args))?;
            check_isa(&line.0, o, "AVX2")?;
            m.torch.add(&line, "torch")?;
            if let Some(v) = field(&line.0, "torch") {
                torch_version = v.to_owned();
            }
            // This round's medians, and the medians of every step so far (the table's).
            let last = |s: &Side| s.rounds.last().map_or(f64::NAN, |r| median(&mut r.clone()));
            let (a, b) = (last(&m.ours), last(&m.torch));
            let (all_a, all_b) = (m.ours.median(), m.torch.median());
            println!(
                "round {round}/{}: {model} {step} {teacher} batch {batch} at {side}px: ours {a:.0} ms, torch {b:.0} ms (so far {all_a:.0} / {all_b:.0})",
                o.rounds
            );
        }
    }
    Ok((measured, torch_version))
}

/// Under `--avx2`, that a side's line says it ran its AVX2 code (`isa`), so that a table never
/// says AVX2 of a run that was not.
fn check_isa(line: &Value, o: &Options, want: &str) -> Result<()> {
    match field(line, "isa") {
        Some(isa) if o.avx2 && isa != want => {
            bail!("asked for the AVX2 paths, but `{line}` ran {isa}")
        }
        None if o.avx2 => bail!("`{line}` does not say which instruction set it ran"),
        _ => Ok(()),
    }
}

/// Puts `table` (which holds its markers) in docs/benchmarks.md in place of what lies between
/// `markers`, or at the end; returns the file.
fn replace_section(table: &str, (start, end): (&str, &str)) -> Result<PathBuf> {
    let path = root().join("docs/benchmarks.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let text = match (text.find(start), text.find(end)) {
        (Some(a), Some(b)) if a < b => format!("{}{table}{}", &text[..a], &text[b + end.len()..]),
        _ => format!("{}\n\n{table}\n", text.trim_end()),
    };
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The last JSON line a benchmark printed and the peak resident size (KiB) it reports.
fn output_with_peak(command: &mut Command) -> Result<(Value, u64)> {
    let line = output(command)?;
    let peak = line["peak_kib"].as_u64().unwrap_or(0);
    Ok((line, peak))
}

/// (layer, op, ours ms, torch ms): the convolution kernels alone, medians over the rounds.
type ConvRow = (String, String, f64, f64);

fn conv_rounds(python: &PathBuf, o: &Options) -> Result<Vec<ConvRow>> {
    let ours_bin = build_example("at-kernels", "conv_bench")?;
    let script = root().join("xtask/bench/torch_conv.py");
    let mut rows: Vec<(String, String, Vec<f64>, Vec<f64>)> = vec![];
    for round in 1..=o.rounds {
        let ours = json_lines(&mut Command::new(&ours_bin))?;
        let torch = json_lines(Command::new(python).arg(&script).arg(o.threads.to_string()))?;
        for (i, (a, b)) in ours.iter().zip(&torch).enumerate() {
            let key = |l: &Value| -> Result<(String, String)> {
                Ok((
                    field(l, "layer").context("no layer")?.to_owned(),
                    field(l, "op").context("no op")?.to_owned(),
                ))
            };
            let (layer, op) = key(a)?;
            if key(b)? != (layer.clone(), op.clone()) {
                bail!("the two convolution benchmarks disagree on line {i}: `{a}` and `{b}`")
            }
            if rows.len() <= i {
                rows.push((layer, op, vec![], vec![]));
            }
            rows[i].2.extend(times(a)?);
            rows[i].3.extend(times(b)?);
        }
        println!("round {round}/{}: convolution kernels", o.rounds);
    }
    Ok(rows
        .into_iter()
        .map(|(l, op, mut a, mut b)| (l, op, median(&mut a), median(&mut b)))
        .collect())
}

/// The JSON lines (those starting with `{`) a benchmark printed, parsed.
fn json_lines(command: &mut Command) -> Result<Vec<Value>> {
    let out = command.output().with_context(|| format!("cannot start {command:?}"))?;
    if !out.status.success() {
        bail!("{command:?} failed: {}", String::from_utf8_lossy(&out.stderr))
    }
    String::from_utf8(out.stdout)?
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).with_context(|| format!("{command:?} printed `{l}`")))
        .collect()
}

fn write(rows: &[Row], convs: &[ConvRow], o: &Options, torch_version: &str) -> Result<()> {
    let machine = machine();
    let date = today();
    let round = |x: f64, digits: i32| (x * 10f64.powi(digits)).round() / 10f64.powi(digits);
    let entry = |model: String, step: &str, teacher: &str, ours: f64, torch: f64, steps: usize| {
        json!({
            "model": model, "step": step, "teacher": teacher, "device": "cpu", "batch": BATCH,
            "ours_ms": round(ours, 2), "torch_ms": round(torch, 2),
            "speedup": round(torch / ours, 3), "machine": machine, "date": date,
            "torch": torch_version, "torch_threads": o.threads, "rounds": o.rounds,
            "steps_per_round": steps,
        })
    };
    let mut json: Vec<Value> = rows
        .iter()
        .map(|r| entry(r.model.to_owned(), r.step, r.teacher, r.ours, r.torch, o.steps))
        .collect();
    json.extend(convs.iter().map(|(layer, op, ours, torch)| {
        entry(format!("conv3x3 {layer}"), op, "", *ours, *torch, 5)
    }));
    let docs = root().join("docs");
    let text = serde_json::to_string_pretty(&json)? + "\n";
    std::fs::write(docs.join("benchmarks.json"), text)?;

    let mut table = format!(
        "{START}\n## Training step: ours against PyTorch (`cargo xtask bench`)\n\n\
         Machine: {machine}. Date: {date}. PyTorch {torch_version} (eager, {} threads) against \
         our release build; batch {BATCH}, CIFAR-shaped random input, SGD with momentum and weight \
         decay. Median over {} rounds of {} timed steps each (after {} untimed), the two sides \
         alternating. `speedup` = torch / ours: above 1 we are faster.\n\n\
         | student | step | teacher | ours (ms) | PyTorch (ms) | speedup |\n|---|---|---|---:|---:|---:|\n",
        o.threads, o.rounds, o.steps, o.warmup
    );
    for r in rows {
        table.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} |\n",
            r.model,
            r.step,
            if r.teacher.is_empty() { "-" } else { r.teacher },
            r.ours,
            r.torch,
            r.torch / r.ours
        ));
    }
    let find = |model: &str, step: &str| rows.iter().find(|r| r.model == model && r.step == step);
    let mut notes = String::new();
    for model in ["wrn-16-1", "wrn-16-2"] {
        if let (Some(s), Some(t), Some(a)) =
            (find(model, "student"), find(model, "teacher"), find(model, "at"))
        {
            let over = |a: f64, s: f64, t: f64| 100.0 * (a - s - t) / (s + t);
            notes.push_str(&format!(
                "- {model} + AT from {}: the AT step costs {:+.1}% over the student step plus the \
                 teacher's forward in ours, {:+.1}% in PyTorch.\n",
                a.teacher,
                over(a.ours, s.ours, t.ours),
                over(a.torch, s.torch, t.torch)
            ));
        }
    }
    if !notes.is_empty() {
        table.push('\n');
        table.push_str(&notes);
    }
    if !convs.is_empty() {
        table.push_str(
            "\nThe convolution kernels alone (`crates/at-kernels/examples/conv_bench.rs` against \
             `xtask/bench/torch_conv.py`): the 3x3 layers of WRN-16-2, batch 128, stride 1, \
             median of 5 per round.\n\n| layer (C x H x W) | op | ours (ms) | PyTorch (ms) | speedup |\n\
             |---|---|---:|---:|---:|\n",
        );
        for (layer, op, ours, torch) in convs {
            table.push_str(&format!(
                "| {layer} | {op} | {ours:.1} | {torch:.1} | {:.2} |\n",
                torch / ours
            ));
        }
    }
    table.push_str(END);
    let path = replace_section(&table, (START, END))?;
    println!("wrote {} and docs/benchmarks.json", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::within_noise;

    /// A table marks a row `~` only where the two sides' rounds overlap.
    #[test]
    fn rounds_that_overlap_are_within_noise_and_separated_ones_are_not() {
        assert!(within_noise(&[977.0, 1045.0], &[1033.0, 921.0]));
        assert!(within_noise(&[500.0], &[500.0]));
        assert!(!within_noise(&[515.0, 520.0], &[609.0, 547.0]));
        assert!(!within_noise(&[610.0, 640.0], &[515.0, 520.0]));
        assert!(!within_noise(&[], &[1.0]));
    }
}
