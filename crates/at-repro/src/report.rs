//! The report of a table: for each cell the median test error over the finished seeds with min
//! and max, how many seeds finished, the paper's number and the difference; missing cells shown
//! as missing; whether each method's difference from the student is larger than the seeds'
//! spread; the machine, device, date and wall time. Markdown for people, CSV for tools; each
//! number links to its runs' `result.json` and `config.toml`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::plan::Plan;
use crate::tables::Row;
use at_trainer::train::RunResult;

/// One cell: a row and what its finished runs measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    /// The row.
    pub row: Row,
    /// Each finished run.
    pub finished: Vec<Finished>,
    /// Seeds planned.
    pub planned: usize,
}

/// A finished run of a cell, from its `result.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    /// Its seed.
    pub seed: u64,
    /// Its final test error, %.
    pub error: f64,
    /// Its key (directory under the plan's `out`).
    pub key: String,
    /// Its wall-clock seconds.
    pub seconds: f64,
}

impl Cell {
    /// The median over the finished seeds (the paper's statistic), if any finished.
    pub fn median(&self) -> Option<f64> {
        let mut e: Vec<f64> = self.finished.iter().map(|f| f.error).collect();
        if e.is_empty() {
            return None;
        }
        e.sort_by(f64::total_cmp);
        let n = e.len();
        Some(if n % 2 == 1 { e[n / 2] } else { (e[n / 2 - 1] + e[n / 2]) / 2.0 })
    }

    /// `(min, max)` over the finished seeds.
    pub fn range(&self) -> Option<(f64, f64)> {
        let e = self.finished.iter().map(|f| f.error);
        let min = e.clone().reduce(f64::min)?;
        Some((min, e.reduce(f64::max)?))
    }
}

/// The cells of `plan` from the `result.json` of its finished runs (missing ones are left out).
pub fn collect(plan: &Plan) -> Result<Vec<Cell>> {
    let mut cells = vec![];
    for row in &plan.rows {
        let keys: Vec<(u64, &String)> = plan
            .cells
            .iter()
            .filter(|((id, _), _)| id == &row.id)
            .map(|((_, seed), key)| (*seed, key))
            .collect();
        let mut cell = Cell { row: row.clone(), finished: vec![], planned: keys.len() };
        for (seed, key) in keys {
            let path = plan.out.join(key).join("result.json");
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            let result: RunResult = serde_json::from_str(&text)
                .with_context(|| format!("{} is damaged", path.display()))?;
            cell.finished.push(Finished {
                seed,
                error: result.test_error,
                key: key.clone(),
                seconds: result.seconds,
            });
        }
        cells.push(cell);
    }
    Ok(cells)
}

/// Where and when the report was made.
#[derive(Clone, Debug, PartialEq)]
pub struct Provenance {
    /// The machine (CPU model and core count).
    pub machine: String,
    /// The date, `YYYY-MM-DD` (UTC).
    pub date: String,
}

impl Provenance {
    /// This machine, today.
    pub fn here() -> Self {
        Self {
            machine: at_trainer::machine(),
            date: chrono::Utc::now().date_naive().format("%Y-%m-%d").to_string(),
        }
    }
}

/// The markdown report of `cells`, its links (to the runs' files under `runs_dir`, laid out as
/// under `plan.out`) relative to `report_dir`.
pub fn markdown(
    plan: &Plan,
    cells: &[Cell],
    provenance: &Provenance,
    report_dir: &Path,
    runs_dir: &Path,
) -> String {
    let mut md = String::new();
    let profile = plan.profile.name;
    let _ = writeln!(md, "# {} — profile `{profile}`\n", plan.table.title());
    let _ = writeln!(
        md,
        "Made by `cargo xtask repro {} --profile {profile}` (runs in `{}`). Test error %, the \
         median over the finished seeds, min-max in brackets; `paper` is the paper's number and \
         `diff` ours minus the paper's. A missing cell has not finished; nothing is filled in.\n",
        plan.table.name(),
        plan.out.display()
    );
    if !plan.profile.paper_data {
        let _ = writeln!(
            md,
            "This profile trains on other data than the paper's, for fewer epochs: `paper` and \
             `diff` show where the numbers sit, not how far a replication is off. Read the \
             columns against each other.\n"
        );
    }
    md.push_str("| row | column | ours (median) | min-max | seeds | paper | diff | runs |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---|\n");
    for cell in cells {
        let row = &cell.row;
        let paper = row.paper.map_or("-".into(), |p| format!("{p:.2}"));
        let seeds = format!("{}/{}", cell.finished.len(), cell.planned);
        let runs: Vec<String> = cell
            .finished
            .iter()
            .map(|Finished { seed, key, .. }| {
                let dir = relative(report_dir, &runs_dir.join(key));
                format!("[{seed}]({}/result.json) ([config]({}/config.toml))", dir, dir)
            })
            .collect();
        match (cell.median(), cell.range()) {
            (Some(median), Some((min, max))) => {
                let diff = row.paper.map_or("-".into(), |p| format!("{:+.2}", median - p));
                let _ = writeln!(
                    md,
                    "| {} | {} | {median:.2} | {min:.2}-{max:.2} | {seeds} | {paper} | {diff} | {} |",
                    row.label,
                    row.header,
                    runs.join(" ")
                );
            }
            _ => {
                let _ = writeln!(
                    md,
                    "| {} | {} | missing | - | {seeds} | {paper} | - | - |",
                    row.label, row.header
                );
            }
        }
    }
    let notes: Vec<String> = cells
        .iter()
        .filter_map(|c| c.row.note.map(|n| format!("- {} / {}: {n}.", c.row.label, c.row.header)))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(md, "\n{}", notes.join("\n"));
    }
    if !plan.skipped.is_empty() {
        let mut why: Vec<&str> = vec![];
        for (_, w) in &plan.skipped {
            if !why.contains(w) {
                why.push(w);
            }
        }
        let _ = writeln!(md, "\nNot run in this profile: {}.", why.join("; "));
    }
    let _ = writeln!(md, "\n## What this measures\n");
    for line in findings(cells) {
        let _ = writeln!(md, "- {line}");
    }
    let devices: Vec<String> = {
        let mut d: Vec<String> = plan.runs.iter().map(|r| r.config.device.to_string()).collect();
        d.sort();
        d.dedup();
        d
    };
    let seconds: f64 = cells_seconds(cells);
    let _ = writeln!(
        md,
        "\nMachine: {}; device: {}; date: {}; wall time of the finished runs: {:.1} minutes.",
        provenance.machine,
        devices.join(", "),
        provenance.date,
        seconds / 60.0
    );
    md
}

/// Seconds of the distinct finished runs (a run several cells share counts once).
fn cells_seconds(cells: &[Cell]) -> f64 {
    let mut runs: Vec<(&String, f64)> =
        cells.iter().flat_map(|c| c.finished.iter().map(|f| (&f.key, f.seconds))).collect();
    runs.sort_by(|a, b| a.0.cmp(b.0));
    runs.dedup_by(|a, b| a.0 == b.0);
    runs.iter().map(|r| r.1).sum()
}

/// Plain sentences on what the numbers show: whether each method's difference from its student
/// is larger than the seeds' spread, and whether the teacher beats the student at all.
pub fn findings(cells: &[Cell]) -> Vec<String> {
    let mut lines = vec![];
    for student in cells.iter().filter(|c| c.row.is_student()) {
        let label = student.row.label;
        let Some(s) = student.median() else { continue };
        let spread = |c: &Cell| c.range().map(|(a, b)| b - a);
        if let Some(teacher) = cells.iter().find(|c| c.row.label == label && c.row.is_teacher())
            && let Some(t) = teacher.median()
            && t >= s
        {
            lines.push(format!(
                "{label}: the teacher's error ({t:.2}) is not below the student's ({s:.2}): this \
                 is a broken experiment (the teacher is too weak at this scale), not a result."
            ));
        }
        for other in cells.iter().filter(|c| {
            c.row.label == label
                && c.row.model == student.row.model
                && c.row.column.method().is_some()
        }) {
            let Some(m) = other.median() else { continue };
            let diff = m - s;
            let line = match (spread(student), spread(other)) {
                (Some(a), Some(b)) if student.finished.len() > 1 && other.finished.len() > 1 => {
                    let spread = a.max(b);
                    let verdict = if diff.abs() > spread {
                        "larger than the seeds' spread: an effect at this scale"
                    } else {
                        "not larger than the seeds' spread: no effect can be read from it"
                    };
                    format!(
                        "{label}, {} - student: {diff:+.2} points; the spread (max - min over \
                         seeds) is {spread:.2}: {verdict}.",
                        other.row.header
                    )
                }
                _ => format!(
                    "{label}, {} - student: {diff:+.2} points, from one seed: no spread to compare \
                     it with.",
                    other.row.header
                ),
            };
            lines.push(line);
        }
    }
    if lines.is_empty() {
        lines.push("Nothing to compare yet: no student cell has finished.".into());
    }
    lines
}

/// The CSV of `cells`: one line per finished run, and one per missing cell.
pub fn csv(plan: &Plan, cells: &[Cell]) -> String {
    let mut out =
        String::from("table,profile,row,column,model,teacher,method,seed,test_error,paper,run\n");
    for cell in cells {
        let r = &cell.row;
        let paper = r.paper.map_or(String::new(), |p| p.to_string());
        let teacher = r.teacher.filter(|_| r.column.needs_teacher()).unwrap_or("");
        let head = format!(
            "{},{},{},{},{},{teacher},{}",
            plan.table.name(),
            plan.profile.name,
            quote(r.label),
            quote(r.header),
            r.model,
            r.column.slug()
        );
        if cell.finished.is_empty() {
            let _ = writeln!(out, "{head},,,{paper},");
        }
        for Finished { seed, error, key, .. } in &cell.finished {
            let _ = writeln!(out, "{head},{seed},{error:.2},{paper},{key}");
        }
    }
    out
}

fn quote(s: &str) -> String {
    if s.contains([',', '"']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.into() }
}

/// The files of a finished run a report keeps beside itself (small; the weights stay in the run).
const KEPT: [&str; 3] = ["result.json", "config.toml", "metrics.jsonl"];

/// Writes `<dir>/<table>-<profile>.md` and `.csv` and returns the two paths. Each number links
/// to its run's `result.json` and `config.toml`: in place where the runs are under `dir` (the
/// default, a report beside its runs), else to copies of each finished run's `result.json`,
/// `config.toml` and `metrics.jsonl` under `<dir>/runs/<profile>/` (so that the links of a
/// report committed elsewhere, like docs/results, hold).
pub fn write(plan: &Plan, dir: &Path, provenance: &Provenance) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cells = collect(plan)?;
    let runs_dir = if absolute(&plan.out).starts_with(absolute(dir)) {
        plan.out.clone()
    } else {
        let runs_dir = dir.join("runs").join(plan.profile.name);
        for key in cells.iter().flat_map(|c| c.finished.iter().map(|f| &f.key)) {
            let to = runs_dir.join(key);
            std::fs::create_dir_all(&to)
                .with_context(|| format!("cannot create {}", to.display()))?;
            for file in KEPT {
                let from = plan.out.join(key).join(file);
                std::fs::copy(&from, to.join(file)).with_context(|| {
                    format!("cannot copy {} into {}", from.display(), to.display())
                })?;
            }
        }
        runs_dir
    };
    let stem = format!("{}-{}", plan.table.name(), plan.profile.name);
    let (md, csv_path) = (dir.join(format!("{stem}.md")), dir.join(format!("{stem}.csv")));
    let text = markdown(plan, &cells, provenance, dir, &runs_dir);
    at_trainer::train::write_atomically(&md, text.as_bytes())?;
    at_trainer::train::write_atomically(&csv_path, csv(plan, &cells).as_bytes())?;
    Ok((md, csv_path))
}

/// `p` made absolute against the working directory (itself where that fails).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `to` relative to the directory `from` (both made absolute), with `/` separators.
fn relative(from: &Path, to: &Path) -> String {
    let rel = pathdiff::diff_paths(absolute(to), absolute(from)).unwrap_or_else(|| absolute(to));
    rel.to_string_lossy().replace('\\', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_links_climb_out_of_the_report_directory() {
        assert_eq!(relative(Path::new("/a/docs/results"), Path::new("/a/runs/x")), "../../runs/x");
        assert_eq!(relative(Path::new("/a"), Path::new("/a/b")), "b");
    }
}
