//! The paper's tables as data: each a list of rows (a label, a typed column, the networks, the
//! paper's number). A new table is a variant of [`Table`] and a function here.
//! Nothing here trains; [`crate::plan`] turns rows into runs.

use serde::{Deserialize, Serialize};

use at_trainer::config::GradientKind;

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
            Table::Table5 => {
                "Table 5: ImageNet, ResNet-18 trained from scratch <- ResNet-34, top-1 error %"
            }
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

/// How a row's student is trained beyond its cross-entropy.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Method {
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
    /// A gradient-based penalty or transfer (Table 3).
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
            Method::Gradient { kind } => kind == GradientKind::Transfer,
            Method::At { .. } | Method::Kd | Method::AtKd => true,
        }
    }
}

/// What a column of a table is. The printed header is the row's [`Row::header`]; what the
/// code does with a cell (train a student alone, train it with a method, train the teacher,
/// compare, publish) follows from this type, never from the header's text.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Column {
    /// The student network alone, cross-entropy only (Table 1's "student", Table 3's
    /// "baseline", Table 5's "ResNet-18").
    Student,
    /// The student trained with a method, against the student column of its row label.
    Method(Method),
    /// The teacher network alone (Table 1's "teacher", Table 5's "ResNet-34"): the run that
    /// teaches the row's methods; the report checks it is better than its student, and it is
    /// not published as a student.
    Teacher,
}

impl Column {
    /// The method, for a [`Column::Method`] cell.
    pub fn method(self) -> Option<Method> {
        match self {
            Column::Method(m) => Some(m),
            Column::Student | Column::Teacher => None,
        }
    }

    /// A short name of what the cell trains, for run directories: `baseline` for a network
    /// alone, else the method's slug.
    pub fn slug(self) -> String {
        self.method().map_or_else(|| "baseline".into(), Method::slug)
    }

    /// Whether the cell's run learns from a teacher.
    pub fn needs_teacher(self) -> bool {
        self.method().is_some_and(Method::needs_teacher)
    }
}

/// One cell of a table: a network trained one way, and the paper's number for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Unique within the table, for `--only`: label and header (e.g. `wrn-16-1<-wrn-16-2/at`).
    pub id: String,
    /// The row label as the paper prints it (e.g. `WRN-16-1 <- WRN-16-2`).
    pub label: &'static str,
    /// The column header as the paper prints it (`student`, `AT`, `AT+KD`, `ResNet-34`, ...).
    pub header: &'static str,
    /// What the column is.
    pub column: Column,
    /// The network trained.
    pub model: &'static str,
    /// The teacher, for the methods that need one.
    pub teacher: Option<&'static str>,
    /// The paper's test error %, when it prints one.
    pub paper: Option<f64>,
    /// What to know when reading the number (e.g. Table 2's `F_sum` row).
    pub note: Option<&'static str>,
    /// The first epoch with attention transfer (Table 5's AT row: 60); 0 from the start.
    pub at_start_epoch: usize,
}

impl Row {
    /// Whether this is the teacher column.
    pub fn is_teacher(&self) -> bool {
        self.column == Column::Teacher
    }

    /// Whether this is the student-alone column.
    pub fn is_student(&self) -> bool {
        self.column == Column::Student
    }
}

fn row(
    label: &'static str,
    header: &'static str,
    column: Column,
    model: &'static str,
    teacher: Option<&'static str>,
    paper: Option<f64>,
) -> Row {
    let id = format!("{}/{}", slug(label), slug(header));
    Row { id, label, header, column, model, teacher, paper, note: None, at_start_epoch: 0 }
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
        let method = |m| Column::Method(m);
        rows.push(row(label, "student", Column::Student, s, None, Some(student)));
        rows.push(row(label, "AT", method(Method::AT), s, Some(t), Some(at)));
        rows.push(row(label, "AT+KD", method(Method::AtKd), s, Some(t), Some(at_kd)));
        rows.push(row(label, "teacher", Column::Teacher, t, None, Some(teacher)));
        // The text discusses KD alone; the table does not print it.
        rows.push(row(label, "KD", method(Method::Kd), s, Some(t), None));
    }
    rows
}

fn table2() -> Vec<Row> {
    let (s, t) = ("wrn-16-1", "wrn-40-1");
    let label = "WRN-16-1 <- WRN-40-1";
    let at = |map, group| Column::Method(Method::At { map, group });
    let mut rows = vec![
        Row {
            note: Some(
                "the paper prints 5.58, better than its own teacher (6.58): very likely a misprint \
                 (8.58?); shown as printed",
            ),
            ..row(label, "F_sum", at(MapFunction::Sum { p: 1.0 }, None), s, Some(t), Some(5.58))
        },
        row(label, "F_sum^2", Column::Method(Method::AT), s, Some(t), Some(8.60)),
        row(label, "F_sum^4", at(MapFunction::Sum { p: 4.0 }, None), s, Some(t), Some(8.58)),
        row(label, "F_max^2", at(MapFunction::Max { p: 2.0 }, None), s, Some(t), Some(8.69)),
        row(label, "KD", Column::Method(Method::Kd), s, Some(t), Some(8.46)),
        row(label, "KD & F_sum^2", Column::Method(Method::AtKd), s, Some(t), Some(8.27)),
    ];
    // Section 4.1: one AT loss on one group at a time against all three (no numbers printed).
    for (g, header) in [(0, "group1 only"), (1, "group2 only"), (2, "group3 only")] {
        rows.push(row(label, header, at(MapFunction::Sum { p: 2.0 }, Some(g)), s, Some(t), None));
    }
    rows
}

fn table3() -> Vec<Row> {
    let (s, t) = ("nin-thin-nobn", "nin-wide-nobn");
    let label = "NIN-thin (no BN)";
    let gradient = |kind| Column::Method(Method::Gradient { kind });
    vec![
        row(label, "baseline", Column::Student, s, None, Some(13.5)),
        row(label, "min", gradient(GradientKind::Jacobian), s, None, Some(12.5)),
        row(label, "symmetry norm", gradient(GradientKind::Symmetry), s, None, Some(11.8)),
        row(label, "AT-NIN-wide", gradient(GradientKind::Transfer), s, Some(t), Some(12.1)),
        row(label, "KD", Column::Method(Method::Kd), s, Some(t), Some(12.1)),
    ]
}

fn table4() -> Vec<Row> {
    let mut rows = vec![];
    for (label, student, at, teacher) in
        [("ImageNet -> CUB", 28.5, 27.0, 26.5), ("ImageNet -> Scenes", 28.2, 27.1, 26.0)]
    {
        let at_column = Column::Method(Method::AT);
        rows.push(row(label, "student", Column::Student, "resnet18", None, Some(student)));
        rows.push(row(label, "AT", at_column, "resnet18", Some("resnet34"), Some(at)));
        rows.push(row(label, "teacher", Column::Teacher, "resnet34", None, Some(teacher)));
    }
    rows
}

fn table5() -> Vec<Row> {
    let label = "ImageNet";
    let at = Column::Method(Method::AT);
    vec![
        row(label, "ResNet-18", Column::Student, "resnet18", None, Some(30.4)),
        Row {
            note: Some(
                "AT added at epoch 60 of 100, as the paper did (top-5 10.4). Beta is 1e3 on the \
                 global batch here, whatever the number of ranks; the authors' code summed the \
                 per-GPU attention losses, so the paper's number had beta 1e3 times its GPUs \
                 (2e3 with the 2 GPUs of their README)",
            ),
            at_start_epoch: 60,
            ..row(label, "AT", at, "resnet18", Some("resnet34"), Some(29.7))
        },
        Row {
            note: Some(
                "AT from the start: the authors' README reports 29.3 (top-5 10.0), with beta \
                 1e3 per GPU as above",
            ),
            ..row(label, "AT from scratch", at, "resnet18", Some("resnet34"), Some(29.3))
        },
        row(label, "ResNet-34", Column::Teacher, "resnet34", None, Some(26.1)),
    ]
}
