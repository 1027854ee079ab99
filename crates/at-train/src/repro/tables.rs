//! The paper's tables as data: each a list of rows (student, teacher, method, the paper's number).
//! Nothing here trains; [`super::plan`] turns rows into runs.

use serde::{Deserialize, Serialize};

use crate::config::GradientKind;

/// A table of the paper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// Activation AT with various architectures on CIFAR-10.
    Table1,
    /// WRN-16-1 <- WRN-40-1 with various attention maps, and the one-group ablation (4.1).
    Table2,
    /// Gradient-based attention (NIN without batch norm).
    Table3,
    /// Fine-tuning ResNet-18 on CUB and Scenes with AT from a fine-tuned ResNet-34.
    Table4,
    /// ImageNet ResNet-18 <- ResNet-34.
    Table5,
}

impl Table {
    /// Every table, in order.
    pub const ALL: [Table; 5] =
        [Table::Table1, Table::Table2, Table::Table3, Table::Table4, Table::Table5];

    /// `table1` ... `table5`.
    pub fn name(self) -> &'static str {
        match self {
            Table::Table1 => "table1",
            Table::Table2 => "table2",
            Table::Table3 => "table3",
            Table::Table4 => "table4",
            Table::Table5 => "table5",
        }
    }

    /// The table named `name`, or an error listing them.
    pub fn parse(name: &str) -> anyhow::Result<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| {
            let known: Vec<&str> = Table::ALL.iter().map(|t| t.name()).collect();
            anyhow::anyhow!("unknown table `{name}`, expected one of {}", known.join(", "))
        })
    }

    /// The paper's caption, shortened.
    pub fn title(self) -> &'static str {
        match self {
            Table::Table1 => {
                "Table 1: activation attention transfer, test error % (the paper: median of 5 runs)"
            }
            Table::Table2 => {
                "Table 2: WRN-16-1 <- WRN-40-1, attention maps and groups, test error % (the paper: median of 5 runs)"
            }
            Table::Table3 => {
                "Table 3: gradient-based attention, NIN-thin, test error % (the paper: one run)"
            }
            Table::Table4 => "Table 4: fine-tuning ResNet-18 on CUB and Scenes, test error %",
            Table::Table5 => "Table 5: ImageNet, ResNet-18 <- ResNet-34, top-1 error %",
        }
    }
}

/// The attention map of an AT row (section 3.1): `|A|^p` summed (or maxed) over channels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum MapFunction {
    /// `F_sum^p`, the channel sum of `|A|^p` (the default, `p = 2`, is the authors' `mean`,
    /// the same map after normalisation).
    Sum {
        /// The power.
        p: f64,
    },
    /// `F_max^p`.
    Max {
        /// The power.
        p: f64,
    },
}

/// What a row trains.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Method {
    /// The network alone, cross-entropy (the "student" and "teacher" columns).
    Baseline,
    /// Activation attention transfer (beta 1e3) with `map`, on `groups` (all paired groups when
    /// `None`, else that one group).
    At {
        /// The map.
        map: MapFunction,
        /// One group only (section 4.1's ablation), or all.
        group: Option<usize>,
    },
    /// Knowledge distillation (alpha 0.9, T 4).
    Kd,
    /// Both (Table 1's AT+KD column; Table 2's "KD & F_sum^2").
    AtKd,
    /// A gradient-based penalty or transfer (Table 3), with distillation when `kd`.
    Gradient {
        /// Which.
        kind: GradientKind,
    },
}

impl Method {
    /// The default AT: `F_sum^2` on every group.
    pub const AT: Method = Method::At { map: MapFunction::Sum { p: 2.0 }, group: None };

    /// A short name for run directories and reports.
    pub fn slug(self) -> String {
        match self {
            Method::Baseline => "baseline".into(),
            Method::Kd => "kd".into(),
            Method::AtKd => "at-kd".into(),
            Method::At { map, group } => {
                let map = match map {
                    MapFunction::Sum { p } if p == 2.0 => String::new(),
                    MapFunction::Sum { p } => format!("-sum-p{p}"),
                    MapFunction::Max { p } => format!("-max-p{p}"),
                };
                let group = group.map_or(String::new(), |g| format!("-group{g}"));
                format!("at{map}{group}")
            }
            Method::Gradient { kind } => format!("gradient-{kind}"),
        }
    }

    /// Whether the method needs a teacher.
    pub fn needs_teacher(self) -> bool {
        match self {
            Method::Baseline => false,
            Method::Gradient { kind } => kind == GradientKind::Transfer,
            Method::At { .. } | Method::Kd | Method::AtKd => true,
        }
    }
}

/// One cell of a table: a network trained one way, and the paper's number for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Unique within the table, for `--only`: label and column (e.g. `wrn-16-1<-wrn-16-2/at`).
    pub id: String,
    /// The row label as the paper prints it (e.g. `WRN-16-1 <- WRN-16-2`).
    pub label: &'static str,
    /// The column (`student`, `AT`, `AT+KD`, `teacher`, ...).
    pub column: &'static str,
    /// The network trained.
    pub model: &'static str,
    /// The teacher, for the methods that need one.
    pub teacher: Option<&'static str>,
    /// How.
    pub method: Method,
    /// The paper's test error %, when it prints one.
    pub paper: Option<f64>,
    /// What to know when reading the number (e.g. Table 2's `F_sum` row).
    pub note: Option<&'static str>,
    /// The first epoch with attention transfer (Table 5's AT row: 60); 0 from the start.
    pub at_start_epoch: usize,
}

fn row(
    label: &'static str,
    column: &'static str,
    model: &'static str,
    teacher: Option<&'static str>,
    method: Method,
    paper: Option<f64>,
) -> Row {
    let id = format!("{}/{}", slug(label), slug(column));
    Row { id, label, column, model, teacher, method, paper, note: None, at_start_epoch: 0 }
}

/// `label` lowercased, `<-` and `->` kept tight, other spaces as dashes: a row id's part.
fn slug(label: &str) -> String {
    label.to_lowercase().replace(" <- ", "<-").replace(" -> ", "->").replace(' ', "-")
}

/// The rows of `table`, in the paper's order.
pub fn rows(table: Table) -> Vec<Row> {
    match table {
        Table::Table1 => table1(),
        Table::Table2 => table2(),
        Table::Table3 => table3(),
        Table::Table4 => table4(),
        Table::Table5 => table5(),
    }
}

fn table1() -> Vec<Row> {
    // (label, student, teacher, [student, AT, AT+KD, teacher] error %)
    let pairs: [(&str, &str, &str, [f64; 4]); 4] = [
        ("NIN-thin <- NIN-wide", "nin-thin", "nin-wide", [9.38, 8.93, 8.70, 7.28]),
        ("WRN-16-1 <- WRN-16-2", "wrn-16-1", "wrn-16-2", [8.77, 8.43, 7.47, 6.31]),
        ("WRN-16-1 <- WRN-40-1", "wrn-16-1", "wrn-40-1", [8.77, 8.59, 8.27, 6.58]),
        ("WRN-16-2 <- WRN-40-2", "wrn-16-2", "wrn-40-2", [6.31, 5.91, 5.80, 5.23]),
    ];
    let mut rows = vec![];
    for (label, s, t, [student, at, at_kd, teacher]) in pairs {
        rows.push(row(label, "student", s, None, Method::Baseline, Some(student)));
        rows.push(row(label, "AT", s, Some(t), Method::AT, Some(at)));
        rows.push(row(label, "AT+KD", s, Some(t), Method::AtKd, Some(at_kd)));
        rows.push(row(label, "teacher", t, None, Method::Baseline, Some(teacher)));
        // The text discusses KD alone; the table does not print it.
        rows.push(row(label, "KD", s, Some(t), Method::Kd, None));
    }
    rows
}

fn table2() -> Vec<Row> {
    let (s, t) = ("wrn-16-1", "wrn-40-1");
    let label = "WRN-16-1 <- WRN-40-1";
    let at = |map, group| Method::At { map, group };
    let mut rows = vec![
        Row {
            note: Some(
                "the paper prints 5.58, better than its own teacher (6.58): very likely a misprint \
                 (8.58?); shown as printed",
            ),
            ..row(label, "F_sum", s, Some(t), at(MapFunction::Sum { p: 1.0 }, None), Some(5.58))
        },
        row(label, "F_sum^2", s, Some(t), Method::AT, Some(8.60)),
        row(label, "F_sum^4", s, Some(t), at(MapFunction::Sum { p: 4.0 }, None), Some(8.58)),
        row(label, "F_max^2", s, Some(t), at(MapFunction::Max { p: 2.0 }, None), Some(8.69)),
        row(label, "KD", s, Some(t), Method::Kd, Some(8.46)),
        row(label, "KD & F_sum^2", s, Some(t), Method::AtKd, Some(8.27)),
    ];
    // Section 4.1: one AT loss on one group at a time against all three (no numbers printed).
    for (g, column) in [(0, "group1 only"), (1, "group2 only"), (2, "group3 only")] {
        rows.push(row(label, column, s, Some(t), at(MapFunction::Sum { p: 2.0 }, Some(g)), None));
    }
    rows
}

fn table3() -> Vec<Row> {
    let (s, t) = ("nin-thin-nobn", "nin-wide-nobn");
    let label = "NIN-thin (no BN)";
    let gradient = |kind| Method::Gradient { kind };
    vec![
        row(label, "baseline", s, None, Method::Baseline, Some(13.5)),
        row(label, "min", s, None, gradient(GradientKind::Jacobian), Some(12.5)),
        row(label, "symmetry norm", s, None, gradient(GradientKind::Symmetry), Some(11.8)),
        row(label, "AT-NIN-wide", s, Some(t), gradient(GradientKind::Transfer), Some(12.1)),
        row(label, "KD", s, Some(t), Method::Kd, Some(12.1)),
    ]
}

fn table4() -> Vec<Row> {
    let mut rows = vec![];
    for (label, student, at, teacher) in
        [("ImageNet -> CUB", 28.5, 27.0, 26.5), ("ImageNet -> Scenes", 28.2, 27.1, 26.0)]
    {
        rows.push(row(label, "student", "resnet18", None, Method::Baseline, Some(student)));
        rows.push(row(label, "AT", "resnet18", Some("resnet34"), Method::AT, Some(at)));
        rows.push(row(label, "teacher", "resnet34", None, Method::Baseline, Some(teacher)));
    }
    rows
}

fn table5() -> Vec<Row> {
    let label = "ImageNet";
    vec![
        row(label, "ResNet-18", "resnet18", None, Method::Baseline, Some(30.4)),
        Row {
            note: Some("AT added at epoch 60 of 100, as the paper did (top-5 10.4)"),
            at_start_epoch: 60,
            ..row(label, "AT", "resnet18", Some("resnet34"), Method::AT, Some(29.7))
        },
        Row {
            note: Some("AT from the start: the authors' README reports 29.3 (top-5 10.0)"),
            ..row(label, "AT from scratch", "resnet18", Some("resnet34"), Method::AT, Some(29.3))
        },
        row(label, "ResNet-34", "resnet34", None, Method::Baseline, Some(26.1)),
    ]
}
