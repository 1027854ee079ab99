//! The figures of a replayed table, from its finished runs: training curves in the manner of
//! the paper's Figure 7 (test error solid, train error dashed, per epoch, for the student, the
//! AT student and the teacher of a row; the AT start marked) as SVG plots (plotters), and
//! attention maps in the manner of Figures 3, 4 and 6 as PNG grids (each group's map for the
//! student, the AT student and the teacher side by side; and `F_sum`, `F_sum^2`, `F_sum^4`,
//! `F_max^2` of one layer in a row), with a markdown caption that says what each row and column
//! is and which class each network predicted.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use at_ops::{MapSpec, attention_map};
use candle_core::{DType, Tensor};
use image::RgbImage;
use plotters::prelude::*;
use rand::SeedableRng;

use crate::plan::Plan;
use crate::tables::{Column, Method};
use at_trainer::config::RunConfig;
use at_trainer::maps::{PANEL, panel_of_image, panel_of_map, paste_at};
use at_trainer::train::{RunModel, read_metrics};

/// Test items shown in the attention-map figures.
const ITEMS: [usize; 4] = [0, 1, 2, 3];

/// The runs of one row label that the figures compare (the first finished seed of each).
struct Trio {
    label: &'static str,
    /// `(column, run directory, AT start epoch)`.
    runs: Vec<(&'static str, PathBuf, usize)>,
}

fn trios(plan: &Plan) -> Vec<Trio> {
    let mut trios: Vec<Trio> = vec![];
    for row in &plan.rows {
        let wanted = match row.column {
            Column::Student | Column::Teacher => true,
            Column::Method(m) => m == Method::AT,
        };
        if !wanted {
            continue;
        }
        let finished = plan.seeds.iter().find_map(|&seed| {
            let key = plan.cells.get(&(row.id.clone(), seed))?;
            let dir = plan.out.join(key);
            dir.join("result.json").exists().then_some(dir)
        });
        let Some(dir) = finished else { continue };
        let entry = (row.header, dir, row.at_start_epoch);
        match trios.iter_mut().find(|t| t.label == row.label) {
            Some(t) => t.runs.push(entry),
            None => trios.push(Trio { label: row.label, runs: vec![entry] }),
        }
    }
    trios
}

/// A file-name part for a row label.
fn slug(label: &str) -> String {
    label.to_lowercase().replace(" <- ", "-from-").replace(' ', "-")
}

/// Writes every figure of `plan` into `dir` (`<table>-<profile>-<row>-{curves.svg, maps.png,
/// map-functions.png}` and `<table>-<profile>-figures.md`); returns the files written.
pub fn write(plan: &Plan, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stem = format!("{}-{}", plan.table.name(), plan.profile.name);
    let mut written = vec![];
    let mut caption =
        format!("# Figures of {} — profile `{}`\n\n", plan.table.title(), plan.profile.name);
    for trio in trios(plan) {
        let base = format!("{stem}-{}", slug(trio.label));
        let curves = dir.join(format!("{base}-curves.svg"));
        curves_svg(&trio, &curves)?;
        let _ = writeln!(
            caption,
            "## {}\n\n![training curves]({base}-curves.svg)\n\nTest error (solid) and training \
             error (dashed) per epoch of {}.\n",
            trio.label,
            trio.runs.iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
        );
        written.push(curves);
        if trio.runs.iter().all(|(_, dir, _)| is_image_run(dir)) {
            let maps = dir.join(format!("{base}-maps.png"));
            let predictions = maps_png(&trio, &maps)?;
            let _ = writeln!(
                caption,
                "![attention maps]({base}-maps.png)\n\nRows: test items {ITEMS:?}. Columns: the \
                 image, then each group's map `mean_c A^2` (L2-normalised; dark blue low, yellow \
                 high) for {}, from the input side.\n\n{predictions}",
                trio.runs.iter().map(|r| r.0).collect::<Vec<_>>().join(", then ")
            );
            written.push(maps);
            let (column, teacher, _) = trio.runs.last().expect("a trio has runs");
            let functions = dir.join(format!("{base}-map-functions.png"));
            map_functions_png(teacher, &functions)?;
            let _ = writeln!(
                caption,
                "![attention mapping functions]({base}-map-functions.png)\n\nThe {column}'s \
                 second group: the image, then `F_sum`, `F_sum^2`, `F_sum^4`, `F_max^2` \
                 (Figure 3).\n"
            );
            written.push(functions);
        }
    }
    let md = dir.join(format!("{stem}-figures.md"));
    at_trainer::train::write_atomically(&md, caption.as_bytes())?;
    written.push(md);
    Ok(written)
}

/// Whether the run trained on small images (the maps' figures load each network).
fn is_image_run(dir: &Path) -> bool {
    RunConfig::load(&dir.join("config.toml")).is_ok()
}

/// Figure 7's manner: test (solid) and train (dashed) error per epoch of each run of `trio`.
fn curves_svg(trio: &Trio, path: &Path) -> Result<()> {
    let series: Vec<(&str, Vec<(f64, f64)>, Vec<(f64, f64)>, usize)> = trio
        .runs
        .iter()
        .map(|(column, dir, start)| {
            let metrics = read_metrics(dir)?;
            let test = metrics.iter().map(|m| (m.epoch as f64, 100.0 - m.test_top1)).collect();
            let train = metrics.iter().map(|m| (m.epoch as f64, 100.0 - m.train_top1)).collect();
            Ok((*column, test, train, *start))
        })
        .collect::<Result<_>>()?;
    let epochs = series.iter().flat_map(|s| s.1.iter().map(|p| p.0)).fold(1.0, f64::max);
    let top = series.iter().flat_map(|s| s.1.iter().chain(&s.2).map(|p| p.1)).fold(1.0, f64::max);
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: error per epoch", trio.label), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(1f64..epochs.max(2.0), 0f64..(top * 1.05))?;
    chart.configure_mesh().x_desc("epoch").y_desc("error %").draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN];
    for (i, (column, test, train, start)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(test.clone(), color.stroke_width(2)))?
            .label(format!("{column}, test"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(DashedLineSeries::new(train.clone(), 6, 4, color.stroke_width(1)))?
            .label(format!("{column}, train"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        if *start > 0 {
            let x = *start as f64 + 0.5;
            chart.draw_series(DashedLineSeries::new(
                vec![(x, 0.0), (x, top)],
                4,
                4,
                BLACK.into(),
            ))?;
        }
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// The first test items of a run, as shown to the network, and as its input tensor.
fn items(model: &RunModel) -> Result<(Vec<at_data::Image>, Vec<Tensor>)> {
    let pipeline = &model.data().test_pipeline;
    let mut shown = vec![];
    let mut inputs = vec![];
    for &i in &ITEMS {
        let (image, _) = model.data().test.get(i)?;
        let image = pipeline.augment(&image, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
        let mut values = vec![0f32; image.data.len()];
        pipeline.normalize_into(&image, &mut values);
        inputs.push(Tensor::from_vec(
            values,
            (1, image.channels, image.height, image.width),
            model.device(),
        )?);
        shown.push(image);
    }
    Ok((shown, inputs))
}

/// Each group's map for each run of `trio`, a row per test item; returns the caption lines with
/// each network's predicted class.
fn maps_png(trio: &Trio, path: &Path) -> Result<String> {
    let models: Vec<RunModel> = trio
        .runs
        .iter()
        .map(|(_, dir, _)| RunModel::open(RunConfig::load(&dir.join("config.toml"))?, dir))
        .collect::<Result<_>>()?;
    let (shown, inputs) = items(&models[0])?;
    let groups = models.iter().map(|m| m.model().group_count()).sum::<usize>() as u32;
    let mut figure = RgbImage::new(PANEL * (1 + groups), PANEL * ITEMS.len() as u32);
    let mut caption = String::from("| item | label |");
    for (column, ..) in &trio.runs {
        let _ = write!(caption, " {column} predicts |");
    }
    caption.push_str("\n|---:|---:|");
    caption.push_str(&"---:|".repeat(trio.runs.len()));
    caption.push('\n');
    for (row, (image, x)) in shown.iter().zip(&inputs).enumerate() {
        let top = PANEL * row as u32;
        paste_at(&mut figure, (0, top), &panel_of_image(image));
        let label = models[0].data().test.get(ITEMS[row])?.1;
        let _ = write!(caption, "| {} | {label} |", ITEMS[row]);
        let mut left = PANEL;
        for model in &models {
            let out = model.model().forward_t(x, false)?;
            let predicted = out.logits.argmax(1)?.to_vec1::<u32>()?[0];
            let _ = write!(caption, " {predicted} |");
            for activation in &out.groups {
                let map = attention_map(activation, &MapSpec::default())?.squeeze(0)?;
                paste_at(
                    &mut figure,
                    (left, top),
                    &panel_of_map(&map.to_dtype(DType::F32)?.to_vec2()?),
                );
                left += PANEL;
            }
        }
        caption.push('\n');
    }
    figure.save(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(caption)
}

/// Figure 3's manner: for each test item, the image and `F_sum`, `F_sum^2`, `F_sum^4`,
/// `F_max^2` of the run's second group.
fn map_functions_png(dir: &Path, path: &Path) -> Result<()> {
    let model = RunModel::open(RunConfig::load(&dir.join("config.toml"))?, dir)?;
    let (shown, inputs) = items(&model)?;
    let specs =
        [MapSpec::sum_abs(), MapSpec::sum_pow(2.0), MapSpec::sum_pow(4.0), MapSpec::max_pow(2.0)];
    let mut figure = RgbImage::new(PANEL * (1 + specs.len() as u32), PANEL * ITEMS.len() as u32);
    for (row, (image, x)) in shown.iter().zip(&inputs).enumerate() {
        let top = PANEL * row as u32;
        paste_at(&mut figure, (0, top), &panel_of_image(image));
        let groups = model.model().forward_t(x, false)?.groups;
        let layer = &groups[1.min(groups.len() - 1)];
        for (i, spec) in specs.iter().enumerate() {
            let map = attention_map(layer, spec)?.squeeze(0)?.to_dtype(DType::F32)?;
            paste_at(&mut figure, (PANEL * (1 + i as u32), top), &panel_of_map(&map.to_vec2()?));
        }
    }
    figure.save(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
