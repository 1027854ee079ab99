//! `repro`: the tables as data against the paper, the plan and dry run of every table and
//! profile, a tiny end-to-end replay that is interrupted and resumed and then reports exactly as
//! an uninterrupted one, and a report that marks what has not finished.

mod common;

use std::path::Path;

use at_repro::plan::{Options, dry_run, plan};
use at_repro::report::{self, Provenance};
use at_repro::tables::{Column, Table, rows};
use at_repro::{Outcome, PROFILES, Profile, execute, execute_run};
use at_trainer::config::{Augmentation, DataConfig, DatasetName, RunConfig};
use common::{quiet, write_dataset};

fn error_of(table: Table, label: &str, header: &str) -> Option<f64> {
    let rows = rows(table);
    let row = rows.iter().find(|r| r.label == label && r.header == header);
    row.unwrap_or_else(|| panic!("{table:?} has no row {label} / {header}")).paper
}

#[test]
fn the_tables_hold_the_papers_rows_numbers_and_registered_models() {
    // Table 1: (label, student, AT, AT+KD, teacher).
    for (label, numbers) in [
        ("NIN-thin <- NIN-wide", [9.38, 8.93, 8.70, 7.28]),
        ("WRN-16-1 <- WRN-16-2", [8.77, 8.43, 7.47, 6.31]),
        ("WRN-16-1 <- WRN-40-1", [8.77, 8.59, 8.27, 6.58]),
        ("WRN-16-2 <- WRN-40-2", [6.31, 5.91, 5.80, 5.23]),
    ] {
        for (column, want) in ["student", "AT", "AT+KD", "teacher"].iter().zip(numbers) {
            assert_eq!(error_of(Table::Table1, label, column), Some(want), "{label} / {column}");
        }
        assert_eq!(error_of(Table::Table1, label, "KD"), None, "KD alone: not in the table");
    }
    let t2 = "WRN-16-1 <- WRN-40-1";
    for (column, want) in [
        ("F_sum", 5.58),
        ("F_sum^2", 8.60),
        ("F_sum^4", 8.58),
        ("F_max^2", 8.69),
        ("KD", 8.46),
        ("KD & F_sum^2", 8.27),
    ] {
        assert_eq!(error_of(Table::Table2, t2, column), Some(want), "Table 2 {column}");
    }
    let f_sum = rows(Table::Table2).into_iter().find(|r| r.header == "F_sum").unwrap();
    assert!(f_sum.note.is_some_and(|n| n.contains("5.58") && n.contains("teacher")));
    let groups: Vec<Column> = rows(Table::Table2)
        .into_iter()
        .filter(|r| r.header.contains("only"))
        .map(|r| r.column)
        .collect();
    assert_eq!(groups.len(), 3, "the one-group ablation of section 4.1");
    let t3 = "NIN-thin (no BN)";
    for (column, want) in [
        ("baseline", 13.5),
        ("min", 12.5),
        ("symmetry norm", 11.8),
        ("AT-NIN-wide", 12.1),
        ("KD", 12.1),
    ] {
        assert_eq!(error_of(Table::Table3, t3, column), Some(want), "Table 3 {column}");
    }
    for (label, numbers) in
        [("ImageNet -> CUB", [28.5, 27.0, 26.5]), ("ImageNet -> Scenes", [28.2, 27.1, 26.0])]
    {
        for (column, want) in ["student", "AT", "teacher"].iter().zip(numbers) {
            assert_eq!(error_of(Table::Table4, label, column), Some(want), "{label} / {column}");
        }
    }
    for (column, want) in [("ResNet-18", 30.4), ("AT", 29.7), ("ResNet-34", 26.1)] {
        assert_eq!(error_of(Table::Table5, "ImageNet", column), Some(want), "Table 5 {column}");
    }
    let at = rows(Table::Table5).into_iter().find(|r| r.header == "AT").unwrap();
    assert_eq!(at.at_start_epoch, 60, "Table 5 adds AT at epoch 60 of 100");
    for table in Table::ALL {
        let rows = rows(table);
        for row in &rows {
            at_models::find(row.model).unwrap();
            if let Some(t) = row.teacher {
                at_models::find(t).unwrap();
            }
            assert_eq!(
                row.column.needs_teacher(),
                row.teacher.is_some() && row.column.needs_teacher()
            );
        }
        let mut ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), rows.len(), "{table:?}: row ids are unique");
    }
}

#[test]
fn every_table_and_profile_plans_and_dry_runs_with_commands_and_times() {
    for table in Table::ALL {
        for profile in PROFILES {
            let options = Options::new(profile);
            let plan = match plan(table, &options) {
                Ok(plan) => plan,
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        matches!(table, Table::Table4 | Table::Table5) && profile.name != "paper",
                        "{table:?} {}: {e}",
                        profile.name
                    );
                    assert!(e.contains("run it with --profile paper"), "{e}");
                    continue;
                }
            };
            // Every run's config is valid, and a teacher's run comes before its students'.
            for (i, run) in plan.runs.iter().enumerate() {
                run.config.validate().unwrap_or_else(|e| panic!("{}: {e:#}", run.key));
                if let Some(t) = &run.teacher {
                    let j =
                        plan.runs.iter().position(|r| &r.key == t).expect("the teacher is planned");
                    assert!(j < i, "{}: its teacher {t} runs first", run.key);
                }
            }
            let seeds = if table == Table::Table3 { 1 } else { profile.seeds };
            assert_eq!(plan.seeds.len(), seeds, "{table:?} {}", profile.name);
            assert!(plan.cells.len() <= plan.rows.len() * seeds);
            let text = dry_run(&plan, &mut |_| Some(0.5));
            for run in &plan.runs {
                assert!(text.contains(&run.key), "{table:?} {}: {} listed", profile.name, run.key);
            }
            assert_eq!(text.matches("at-train train --run-dir").count(), plan.runs.len());
            assert!(text.contains("estimated training time here"), "{text}");
        }
    }
    // The paper profile is the paper's recipe: 200 CIFAR epochs, SGD 0.1, 5 seeds.
    let paper = plan(Table::Table1, &Options::new(Profile::named("paper").unwrap())).unwrap();
    // Six networks' baselines (a student's run serves two rows, a teacher's its pair) and
    // three methods per pair, five seeds each.
    assert_eq!(paper.runs.len(), 6 * 5 + 4 * 3 * 5, "each run planned once");
    assert!(paper.runs.iter().all(|r| r.config.epochs == 200 && r.config.optim.lr == 0.1));
}

/// A tiny replay: Table 1's AT and teacher rows, one seed, on generated data: the teacher's
/// run (which the teacher row reports), then the AT student's.
fn tiny_plan(data: &Path, out: &Path) -> at_repro::Plan {
    let options = Options {
        seeds: Some(1),
        only: Some("wrn-16-1<-wrn-16-2/".into()),
        out: out.to_path_buf(),
        ..Options::new(Profile::named("quick").unwrap())
    };
    let mut plan = plan(Table::Table1, &options).unwrap();
    let wanted = ["wrn-16-1<-wrn-16-2/at", "wrn-16-1<-wrn-16-2/teacher"];
    plan.rows.retain(|r| wanted.contains(&r.id.as_str()));
    plan.cells.retain(|(row, _), _| wanted.contains(&row.as_str()));
    assert_eq!(plan.rows.len(), 2);
    let keep: Vec<String> = plan.cells.values().cloned().collect();
    plan.runs.retain(|r| keep.contains(&r.key));
    for run in &mut plan.runs {
        run.config = RunConfig {
            data: DataConfig {
                dataset: DatasetName::FashionMnist,
                root: data.to_path_buf(),
                augment: Augmentation::None,
                train_limit: 0,
                test_limit: 0,
                side: 0,
            },
            // The student trains long enough (12 batches) to be stopped in the middle.
            epochs: if run.teacher.is_some() { 4 } else { 1 },
            batch_size: 16,
            threads: 2,
            ..run.config.clone()
        };
    }
    plan
}

/// Set in the child process of the replay test: `DATA_DIR|OUT_DIR` of the plan it executes.
const CHILD: &str = "AT_TEST_REPRO_CHILD";

#[test]
fn a_replay_killed_and_resumed_reports_as_an_uninterrupted_one() {
    if let Ok(dirs) = std::env::var(CHILD) {
        // The child: `repro` as the binary runs it, with its signal handler.
        let (data, out) = dirs.split_once('|').unwrap();
        // The binary's handler: a signal asks the run's interrupt handle to stop.
        let interrupt = at_trainer::train::Interrupt::new();
        let handle = interrupt.clone();
        ctrlc::set_handler(move || handle.request()).unwrap();
        let options = at_trainer::train::RunOptions { interrupt, ..quiet() };
        let finished = execute(&tiny_plan(Path::new(data), Path::new(out)), &options).unwrap();
        println!("child finished: {finished}");
        return;
    }
    let data = tempfile::tempdir().unwrap();
    write_dataset(data.path(), "train", 48, 5);
    write_dataset(data.path(), "t10k", 16, 6);
    let runs = tempfile::tempdir().unwrap();

    let straight = tiny_plan(data.path(), &runs.path().join("straight"));
    assert_eq!(
        straight.runs.len(),
        2,
        "{:?}",
        straight.runs.iter().map(|r| &r.key).collect::<Vec<_>>()
    );
    assert!(execute(&straight, &quiet()).unwrap());

    // The same plan in a child process, killed (SIGTERM, as `kill` sends) once its first run,
    // the teacher, has finished: it stops after the batch in flight of the second.
    let resumed = tiny_plan(data.path(), &runs.path().join("resumed"));
    let (teacher, student) =
        (resumed.out.join(&resumed.runs[0].key), resumed.out.join(&resumed.runs[1].key));
    assert!(resumed.runs[1].teacher.is_some(), "the teacher runs first");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_replay_killed_and_resumed_reports_as_an_uninterrupted_one"])
        .args(["--nocapture", "--test-threads=1"])
        .env(CHILD, format!("{}|{}", data.path().display(), resumed.out.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while !teacher.join("result.json").exists() {
        assert!(std::time::Instant::now() < deadline, "the child's teacher never finished");
        assert!(child.try_wait().unwrap().is_none(), "the child ended before its teacher");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("child finished: false"), "stopped mid-plan: {stdout}");
    assert!(!student.join("result.json").exists(), "the student was stopped before its end");
    let latest = std::fs::read_to_string(student.join("checkpoints/latest")).unwrap();
    assert!(
        latest.starts_with("epoch-") && !latest.ends_with("batch-00000"),
        "a checkpoint after the batch in flight: {latest}"
    );

    assert!(execute(&resumed, &quiet()).unwrap(), "the same plan again finishes it");
    assert!(matches!(
        execute_run(&resumed.out, &resumed.runs[0], &quiet()).unwrap(),
        Outcome::Reused(_)
    ));

    // `publish --table` finds the finished student (not the teacher), named after model, method
    // and teacher.
    let (students, unfinished) = resumed.finished_students();
    assert!(unfinished.is_empty(), "{unfinished:?}");
    let repos: Vec<String> = students
        .iter()
        .map(|r| at_hub::publish::repro_repo_name("someone", &r.key, &r.config, "quick"))
        .collect();
    assert_eq!(repos, ["someone/wrn-16-1-at-from-wrn-16-2-fashion-mnist-seed0-quick"]);

    let cells = |p: &at_repro::Plan| report::csv(p, &report::collect(p).unwrap());
    assert_eq!(cells(&resumed), cells(&straight), "the same errors, run for run");
    let md = report::markdown(
        &resumed,
        &report::collect(&resumed).unwrap(),
        &Provenance::here(),
        runs.path(),
        &resumed.out,
    );
    // Each row shows what its runs measured, the paper's number and their difference.
    let cells = report::collect(&resumed).unwrap();
    for (header, paper) in [("AT", 8.43), ("teacher", 6.31)] {
        let cell = cells.iter().find(|c| c.row.header == header).unwrap();
        let measured = cell.finished[0].error;
        let line = md
            .lines()
            .find(|l| l.starts_with(&format!("| WRN-16-1 <- WRN-16-2 | {header} |")))
            .unwrap_or_else(|| panic!("no {header} row: {md}"));
        let want = format!(
            "| {header} | {measured:.2} | {measured:.2}-{measured:.2} | 1/1 | {paper:.2} | {:+.2} |",
            measured - paper
        );
        assert!(line.contains(&want), "`{want}` in `{line}`");
    }
    assert!(
        md.contains("result.json") && md.contains("config.toml"),
        "each number links its run: {md}"
    );

    // The written report keeps a copy of each run's result, config and metrics, and every link
    // of it leads to a file.
    let docs = runs.path().join("docs");
    let (md_path, csv_path) = report::write(&resumed, &docs, &Provenance::here()).unwrap();
    assert!(csv_path.exists());
    let text = std::fs::read_to_string(&md_path).unwrap();
    let links: Vec<&str> =
        text.split("](").skip(1).map(|rest| rest.split(')').next().unwrap()).collect();
    assert!(links.len() >= 2, "{text}");
    for link in links {
        assert!(docs.join(link).exists(), "a dead link {link} in {text}");
        assert!(link.starts_with("runs/quick/"), "links stay beside the report: {link}");
    }

    // By default the report sits beside its runs and links into them: nothing is copied.
    let (beside, _) = report::write(&resumed, &resumed.out, &Provenance::here()).unwrap();
    assert_eq!(beside, resumed.out.join("table1-quick.md"));
    let text = std::fs::read_to_string(&beside).unwrap();
    let links: Vec<&str> =
        text.split("](").skip(1).map(|rest| rest.split(')').next().unwrap()).collect();
    assert!(links.len() >= 2, "{text}");
    for link in links {
        assert!(resumed.out.join(link).exists(), "a dead link {link} in {text}");
        assert!(!link.starts_with("runs/") && !link.starts_with(".."), "into the runs: {link}");
    }
    assert!(!resumed.out.join("runs").exists(), "no copies beside the runs themselves");

    // The figures: training curves as an SVG plot, attention maps as PNG grids of the expected
    // size (4 test items; the image, the AT student's 3 groups and the teacher's 3; the image
    // and 4 map functions), and their caption.
    let figures = at_repro::figures::write(&resumed, &runs.path().join("figures")).unwrap();
    let named = |end: &str| figures.iter().find(|f| f.to_string_lossy().ends_with(end)).unwrap();
    let svg = std::fs::read_to_string(named("-curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("width=\"720\" height=\"440\""), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>") && svg.contains("AT, test"));
    let size = |end: &str| {
        let png = image::open(named(end)).unwrap();
        (png.width(), png.height())
    };
    assert_eq!(size("-maps.png"), (128 * 7, 128 * 4));
    assert_eq!(size("-map-functions.png"), (128 * 5, 128 * 4));
    let caption = std::fs::read_to_string(named("-figures.md")).unwrap();
    assert!(caption.contains("AT predicts") && caption.contains("F_max^2"), "{caption}");
}

#[test]
fn the_report_shows_unfinished_cells_as_missing() {
    let out = tempfile::tempdir().unwrap();
    let options =
        Options { out: out.path().to_path_buf(), ..Options::new(Profile::named("quick").unwrap()) };
    let plan = plan(Table::Table1, &options).unwrap();
    let cells = report::collect(&plan).unwrap();
    let md = report::markdown(&plan, &cells, &Provenance::here(), out.path(), &plan.out);
    assert_eq!(md.matches("| missing |").count(), plan.rows.len(), "{md}");
    assert!(md.contains("0/3"), "{md}");
    assert!(md.contains("Not run in this profile"), "{md}");
    assert!(md.contains("Nothing to compare yet"), "{md}");
    let csv = report::csv(&plan, &cells);
    assert_eq!(csv.lines().count(), 1 + plan.rows.len(), "a line per missing cell: {csv}");
}

/// Table 5 heads its teacher column "ResNet-34", not "teacher": the column's type says it is the
/// teacher, so `publish --table` does not offer it as a student and the report checks that it
/// beats the student.
#[test]
fn table5s_resnet34_column_is_the_teacher_for_publishing_and_for_the_reports_check() {
    let out = tempfile::tempdir().unwrap();
    let paper = Profile::named("paper").unwrap();
    let options = Options { seeds: Some(1), out: out.path().to_path_buf(), ..Options::new(paper) };
    let plan = plan(Table::Table5, &options).unwrap();
    let resnet34 = plan.rows.iter().find(|r| r.header == "ResNet-34").unwrap();
    assert_eq!(resnet34.column, Column::Teacher);
    // Every run finished, the teacher worse than its student: a broken experiment.
    for run in &plan.runs {
        let dir = plan.out.join(&run.key);
        std::fs::create_dir_all(&dir).unwrap();
        let error = if run.config.student == "resnet34" { 35.0 } else { 30.0 };
        let result = at_trainer::train::RunResult {
            student: run.config.student.clone(),
            teacher: run.config.teacher.as_ref().map(|t| t.model.clone()),
            epochs: run.config.epochs,
            test_top1: 100.0 - error,
            test_top5: 90.0,
            test_error: error,
            seconds: 1.0,
            interrupted: false,
            machine: String::new(),
        };
        std::fs::write(dir.join("result.json"), serde_json::to_string(&result).unwrap()).unwrap();
    }
    let (students, unfinished) = plan.finished_students();
    assert!(unfinished.is_empty(), "{unfinished:?}");
    let offered: Vec<&str> = students.iter().map(|r| r.config.student.as_str()).collect();
    assert_eq!(offered, ["resnet18"; 3], "the ResNet-18 cells, not the ResNet-34 teacher");
    let findings = report::findings(&report::collect(&plan).unwrap());
    assert!(
        findings
            .iter()
            .any(|l| l.starts_with("ImageNet: the teacher's error (35.00) is not below")
                && l.contains("broken experiment")),
        "{findings:#?}"
    );
}

#[test]
fn zero_seeds_are_refused_before_any_work() {
    let quick = Profile::named("quick").unwrap();
    let err = plan(Table::Table1, &Options { seeds: Some(0), ..Options::new(quick) }).unwrap_err();
    assert!(err.to_string().contains("--seeds 0 plans no run: give at least 1"), "{err}");
    let err = Profile::named("huge").unwrap_err().to_string();
    assert!(err.contains("unknown profile `huge`, expected one of paper, fmnist, quick"), "{err}");
}

/// A table the profile lacks is refused with what the table is (Table 5 trains ResNet-18 from
/// scratch on ImageNet, not Table 4's fine-tuning) and the profile that has it.
#[test]
fn a_table_the_profile_lacks_is_refused_saying_what_the_table_is() {
    let quick = Profile::named("quick").unwrap();
    let err = plan(Table::Table5, &Options::new(quick)).unwrap_err().to_string();
    assert!(
        err.starts_with("table5 (Table 5: ImageNet, ResNet-18 trained from scratch <- ResNet-34")
            && err.contains("is not in the quick profile")
            && err.ends_with("run it with --profile paper"),
        "{err}"
    );
    assert!(!err.contains("fine-tun") && !err.contains("pretrained"), "{err}");
}
