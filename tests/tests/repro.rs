//! `repro`: the tables as data against the paper, the plan and dry run of every table and
//! profile, a tiny end-to-end replay that is interrupted and resumed and then reports exactly as
//! an uninterrupted one, and a report that marks what has not finished.

mod common;

use std::path::Path;

use at_train::config::{Augmentation, DataConfig, DatasetName, RunConfig};
use at_train::repro::plan::{Options, Profile, dry_run, plan};
use at_train::repro::report::{self, Provenance};
use at_train::repro::tables::{Method, Table, rows};
use at_train::repro::{Outcome, execute, execute_run};
use at_train::train::RunOptions;
use common::{quiet, write_dataset};

fn error_of(table: Table, label: &str, column: &str) -> Option<f64> {
    let rows = rows(table);
    let row = rows.iter().find(|r| r.label == label && r.column == column);
    row.unwrap_or_else(|| panic!("{table:?} has no row {label} / {column}")).paper
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
    let f_sum = rows(Table::Table2).into_iter().find(|r| r.column == "F_sum").unwrap();
    assert!(f_sum.note.is_some_and(|n| n.contains("5.58") && n.contains("teacher")));
    let groups: Vec<Method> = rows(Table::Table2)
        .into_iter()
        .filter(|r| r.column.contains("only"))
        .map(|r| r.method)
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
    let at = rows(Table::Table5).into_iter().find(|r| r.column == "AT").unwrap();
    assert_eq!(at.at_start_epoch, 60, "Table 5 adds AT at epoch 60 of 100");
    for table in Table::ALL {
        let rows = rows(table);
        for row in &rows {
            at_models::find(row.model).unwrap();
            if let Some(t) = row.teacher {
                at_models::find(t).unwrap();
            }
            assert_eq!(
                row.method.needs_teacher(),
                row.teacher.is_some() && row.method.needs_teacher()
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
        for profile in [Profile::Paper, Profile::Fmnist, Profile::Quick] {
            let options = Options::new(profile);
            let plan = match plan(table, &options) {
                Ok(plan) => plan,
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        matches!(table, Table::Table4 | Table::Table5) && profile != Profile::Paper,
                        "{table:?} {profile:?}: {e}"
                    );
                    assert!(e.contains("only the paper profile"), "{e}");
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
            let seeds = if table == Table::Table3 { 1 } else { profile.default_seeds() };
            assert_eq!(plan.seeds.len(), seeds, "{table:?} {profile:?}");
            assert!(plan.cells.len() <= plan.rows.len() * seeds);
            let text = dry_run(&plan, &mut |_| Some(0.5));
            for run in &plan.runs {
                assert!(text.contains(&run.key), "{table:?} {profile:?}: {} listed", run.key);
            }
            assert_eq!(text.matches("at-train train --run-dir").count(), plan.runs.len());
            assert!(text.contains("estimated training time here"), "{text}");
        }
    }
    // The paper profile is the paper's recipe: 200 CIFAR epochs, SGD 0.1, 5 seeds.
    let paper = plan(Table::Table1, &Options::new(Profile::Paper)).unwrap();
    // Six networks' baselines (a student's run serves two rows, a teacher's its pair) and
    // three methods per pair, five seeds each.
    assert_eq!(paper.runs.len(), 6 * 5 + 4 * 3 * 5, "each run planned once");
    assert!(paper.runs.iter().all(|r| r.config.epochs == 200 && r.config.optim.lr == 0.1));
}

/// A tiny replay: Table 1's AT row, one seed, on generated data: the teacher's run, then the
/// student's, which is interrupted after a batch and resumed by running the same plan again.
fn tiny_plan(data: &Path, out: &Path) -> at_train::repro::Plan {
    let options = Options {
        seeds: Some(1),
        only: Some("wrn-16-1<-wrn-16-2/at".into()),
        out: out.to_path_buf(),
        ..Options::new(Profile::Quick)
    };
    let mut plan = plan(Table::Table1, &options).unwrap();
    plan.rows.truncate(1); // AT only (the prefix also matches AT+KD)
    plan.cells.retain(|(row, _), _| row == "wrn-16-1<-wrn-16-2/at");
    // The AT row's runs and the teacher they learn from.
    let mut keep: Vec<String> = plan.cells.values().cloned().collect();
    let teachers: Vec<String> = plan
        .runs
        .iter()
        .filter(|r| keep.contains(&r.key))
        .filter_map(|r| r.teacher.clone())
        .collect();
    keep.extend(teachers);
    plan.runs.retain(|r| keep.contains(&r.key));
    for run in &mut plan.runs {
        run.config = RunConfig {
            data: DataConfig {
                dataset: DatasetName::FashionMnist,
                root: data.to_path_buf(),
                augment: Augmentation::None,
                train_limit: 0,
                test_limit: 0,
            },
            epochs: 1,
            batch_size: 16,
            threads: 2,
            ..run.config.clone()
        };
    }
    plan
}

#[test]
fn a_replay_interrupted_and_resumed_reports_as_an_uninterrupted_one() {
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

    let resumed = tiny_plan(data.path(), &runs.path().join("resumed"));
    // The teacher finishes, then the student is stopped after one batch ("killed").
    assert!(matches!(
        execute_run(&resumed.out, &resumed.runs[0], &quiet()).unwrap(),
        Outcome::Trained(_)
    ));
    let stop = RunOptions { stop_after_batches: Some(1), ..quiet() };
    assert_eq!(execute_run(&resumed.out, &resumed.runs[1], &stop).unwrap(), Outcome::Interrupted);
    assert!(!execute(&resumed, &stop).unwrap(), "stopped again mid-run");
    assert!(execute(&resumed, &quiet()).unwrap(), "the same plan again finishes it");
    assert!(matches!(
        execute_run(&resumed.out, &resumed.runs[0], &quiet()).unwrap(),
        Outcome::Reused(_)
    ));

    let cells = |p: &at_train::repro::Plan| report::csv(p, &report::collect(p).unwrap());
    assert_eq!(cells(&resumed), cells(&straight), "the same errors, run for run");
    let md = report::markdown(
        &resumed,
        &report::collect(&resumed).unwrap(),
        &Provenance::here(),
        runs.path(),
        &resumed.out,
    );
    assert!(md.contains("| WRN-16-1 <- WRN-16-2 | AT |") && md.contains("| 8.43 |"), "{md}");
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

    // The figures: training curves as an SVG plot, attention maps as PNG grids of the expected
    // size (4 test items; the image and the AT student's 3 groups; the image and 4 map
    // functions), and their caption.
    let figures = at_train::repro::figures::write(&resumed, &runs.path().join("figures")).unwrap();
    let named = |end: &str| figures.iter().find(|f| f.to_string_lossy().ends_with(end)).unwrap();
    let svg = std::fs::read_to_string(named("-curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("width=\"720\" height=\"440\""), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>") && svg.contains("AT, test"));
    let size = |end: &str| {
        let png = image::open(named(end)).unwrap();
        (png.width(), png.height())
    };
    assert_eq!(size("-maps.png"), (128 * 4, 128 * 4));
    assert_eq!(size("-map-functions.png"), (128 * 5, 128 * 4));
    let caption = std::fs::read_to_string(named("-figures.md")).unwrap();
    assert!(caption.contains("AT predicts") && caption.contains("F_max^2"), "{caption}");
}

#[test]
fn the_report_shows_unfinished_cells_as_missing() {
    let out = tempfile::tempdir().unwrap();
    let options = Options { out: out.path().to_path_buf(), ..Options::new(Profile::Quick) };
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
