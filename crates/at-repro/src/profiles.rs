//! The profiles: how big the runs of a replayed table are. One table of values, like the
//! trainer's presets: a new profile is one more entry of [`PROFILES`].

use anyhow::{Result, bail};
use at_trainer::config::{DatasetName, RunConfig, recipes};

use crate::tables::{Column, Method, Row, Table};

/// How big the runs are: the base config of every row, the seeds, the teacher's scale, and the
/// rows it leaves out.
#[derive(Debug)]
pub struct Profile {
    /// The name `--profile` takes.
    pub name: &'static str,
    /// One line about it.
    pub about: &'static str,
    /// Seeds per cell when `--seeds` is not given (the paper reports the median of 5).
    pub seeds: usize,
    /// The tables it has (Tables 4 and 5 need the paper's datasets and ImageNet weights).
    pub tables: &'static [Table],
    /// Whether it trains on the paper's data, so that its numbers compare with the paper's.
    pub paper_data: bool,
    /// One teacher for every seed, `(seed, epochs)`, where a teacher trained as briefly as the
    /// students would not be better than they are; `None`: a teacher per seed, trained as its
    /// students are.
    pub shared_teacher: Option<(u64, usize)>,
    /// The config of `row` of `table` before its method (the network and seed are set after).
    base: fn(Table, &Row) -> Result<RunConfig>,
    /// Rows it leaves out, with why.
    skip: fn(Table, &Row) -> Option<&'static str>,
}

impl PartialEq for Profile {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

/// Tables 1 to 3: the CIFAR-sized ones.
const SMALL_TABLES: &[Table] = &[Table::Table1, Table::Table2, Table::Table3];

/// The quick profile's teacher epochs (one teacher, seed 0): trained longer than its students,
/// so that it is clearly better than they are at a scale where a teacher trained as briefly is
/// not (measured: WRN-16-2 21.3% against WRN-16-1's 22.7-25.5% after 4 epochs on 4,000 images;
/// at the profile's scale, 2,000 images at 28x28, the 8-epoch teacher made 21.85% against the
/// students' 28.25-29.75% after 4).
pub const QUICK_TEACHER_EPOCHS: usize = 8;

/// Every profile.
pub const PROFILES: &[Profile] = &[
    Profile {
        name: "paper",
        about: "the paper's datasets and recipes (CIFAR-10 200 epochs, 5 seeds; CUB, Scenes, ImageNet): for a GPU",
        seeds: 5,
        tables: &Table::ALL,
        paper_data: true,
        shared_teacher: None,
        base: paper_base,
        skip: |_, _| None,
    },
    Profile {
        name: "fmnist",
        about: "the same rows on the full Fashion-MNIST (60k/10k, padded to 32x32), 5 epochs, 3 seeds",
        seeds: 3,
        tables: SMALL_TABLES,
        paper_data: false,
        shared_teacher: None,
        base: |table, _| Ok(small_table(table, recipes::fmnist())),
        skip: |_, _| None,
    },
    Profile {
        name: "quick",
        about: "the README's quick look: the embedded Fashion-MNIST subset, minutes on a CPU",
        seeds: 3,
        tables: SMALL_TABLES,
        paper_data: false,
        shared_teacher: Some((0, QUICK_TEACHER_EPOCHS)),
        base: |table, _| Ok(small_table(table, recipes::quick())),
        skip: quick_skips,
    },
];

impl Profile {
    /// The profile named `name`, or an error listing them.
    pub fn named(name: &str) -> Result<&'static Profile> {
        match PROFILES.iter().find(|p| p.name == name) {
            Some(p) => Ok(p),
            None => {
                let known: Vec<&str> = PROFILES.iter().map(|p| p.name).collect();
                bail!("unknown profile `{name}`, expected one of {}", known.join(", "))
            }
        }
    }

    /// The teacher's `(seed, epochs)` for students of `seed`: the shared teacher's, else the
    /// students' seed and epochs (`None`).
    pub fn teacher(&self, seed: u64) -> (u64, Option<usize>) {
        match self.shared_teacher {
            Some((seed, epochs)) => (seed, Some(epochs)),
            None => (seed, None),
        }
    }

    /// The config of `row` of `table` before its method.
    pub fn base(&self, table: Table, row: &Row) -> Result<RunConfig> {
        (self.base)(table, row)
    }

    /// Why this profile leaves `row` out, if it does.
    pub fn skips(&self, table: Table, row: &Row) -> Option<&'static str> {
        (self.skip)(table, row)
    }
}

/// Table 3 trains as section 4.1.1 says ([`recipes::gradient_table`]); the others as `base`.
fn small_table(table: Table, base: RunConfig) -> RunConfig {
    if table == Table::Table3 { recipes::gradient_table(base) } else { base }
}

/// The paper's recipe for each table: the trainer's presets.
fn paper_base(table: Table, row: &Row) -> Result<RunConfig> {
    Ok(match table {
        Table::Table1 | Table::Table2 => recipes::cifar(),
        Table::Table3 => recipes::nin(),
        Table::Table4 => {
            let dataset = match crate::plan::dataset_tag(table, row) {
                Some("cub") => DatasetName::Cub,
                _ => DatasetName::Scenes,
            };
            // torchvision's ImageNet weights of the row's own network
            // (`cargo xtask download resnet18-imagenet`).
            RunConfig {
                pretrained: format!("hf://timm/{}.tv_in1k", row.model).into(),
                ..recipes::finetune(dataset)
            }
        }
        Table::Table5 => recipes::imagenet(),
    })
}

/// The quick profile runs Table 1's WRN-16-1 <- WRN-16-2 pair only, without KD alone.
fn quick_skips(table: Table, row: &Row) -> Option<&'static str> {
    match table {
        Table::Table1 if row.label != "WRN-16-1 <- WRN-16-2" => Some(
            "the quick profile runs Table 1's WRN-16-1 <- WRN-16-2 pair only (minutes on a CPU)",
        ),
        Table::Table1 if row.column == Column::Method(Method::Kd) => {
            Some("the quick profile leaves out KD alone, which the paper's table does not print")
        }
        _ => None,
    }
}
