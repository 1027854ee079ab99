//! `at-train maps`: the attention maps of a trained model, each group's map beside the image it
//! was computed on, as PNG files (the paper's figures 4 and 6, for our models).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use at_data::Image;
use at_ops::{MapSpec, attention_map};
use candle_core::{DType, Tensor};
use image::{Rgb, RgbImage};
use rand::SeedableRng;

use crate::config::RunConfig;
use crate::train::RunModel;

/// The side, in pixels, of each panel of a written figure.
pub const PANEL: u32 = 128;

/// Where the pictures come from.
pub enum Source {
    /// Image files (JPEG or PNG), resized to the training images' size.
    Files(Vec<PathBuf>),
    /// Items of the run's test set, by index.
    TestItems(Vec<usize>),
}

/// Writes one PNG per image into `out`: the image, then the normalised `F(A) = mean_c A^2` map of
/// each group, upsampled to the same panel size. Returns the files written.
pub fn write_maps(run_dir: &Path, source: Source, out: &Path) -> Result<Vec<PathBuf>> {
    let config = RunConfig::load(&run_dir.join("config.toml"))?;
    write_maps_of(config, run_dir, source, out)
}

/// [`write_maps`] for the model in `dir` (its `model.safetensors`) trained by `config`: a run
/// directory, or a published model's local copy.
pub fn write_maps_of(
    config: RunConfig,
    dir: &Path,
    source: Source,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let run = RunModel::open(config, dir)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (side, channels) = run.input_shape()?;
    let items: Vec<(String, Image)> = match source {
        Source::Files(paths) => paths
            .iter()
            .map(|p| {
                let image = Image::open(p)?;
                let stem = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "image".into());
                Ok((stem, fit(&image, side, channels)))
            })
            .collect::<Result<_>>()?,
        Source::TestItems(indices) => indices
            .iter()
            .map(|&i| {
                let test = &run.data().test;
                anyhow::ensure!(
                    i < test.len(),
                    "test item {i} does not exist: the test set has {} items",
                    test.len()
                );
                Ok((format!("test-{i}"), test.get(i)?.0))
            })
            .collect::<Result<_>>()?,
    };
    let mut written = vec![];
    for (stem, image) in items {
        let pipeline = &run.data().test_pipeline;
        let shown = pipeline.augment(&image, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
        let mut values = vec![0f32; shown.data.len()];
        pipeline.normalize_into(&shown, &mut values);
        let x =
            Tensor::from_vec(values, (1, shown.channels, shown.height, shown.width), run.device())?;
        let groups = run.model().forward_t(&x, false)?.groups;
        let mut figure = RgbImage::new(PANEL * (1 + groups.len() as u32), PANEL);
        paste(&mut figure, 0, &panel_of_image(&shown));
        for (g, activation) in groups.iter().enumerate() {
            let map =
                attention_map(activation, &MapSpec::default())?.squeeze(0)?.to_dtype(DType::F32)?;
            paste(&mut figure, PANEL * (1 + g as u32), &panel_of_map(&map.to_vec2()?));
        }
        let path = out.join(format!("{stem}.png"));
        figure.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Converts to the run's channels and resizes to its square training size.
fn fit(image: &Image, side: usize, channels: usize) -> Image {
    let image = if channels == 1 && image.channels == 3 {
        let grey = image
            .data
            .chunks_exact(3)
            .map(|p| ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114) / 1000) as u8);
        Image::new(image.height, image.width, 1, grey.collect())
    } else {
        image.clone()
    };
    image.resize(side, side)
}

/// An image as a panel, scaled to [`PANEL`] pixels a side.
pub fn panel_of_image(image: &Image) -> RgbImage {
    let c = image.channels;
    RgbImage::from_fn(PANEL, PANEL, |x, y| {
        let row = y as usize * image.height / PANEL as usize;
        let col = x as usize * image.width / PANEL as usize;
        let px = &image.data[(row * image.width + col) * c..][..c];
        if c == 1 { Rgb([px[0]; 3]) } else { Rgb([px[0], px[1], px[2]]) }
    })
}

/// A map as a heat panel: dark blue (low) through red to yellow (high), scaled to its maximum.
pub fn panel_of_map(map: &[Vec<f32>]) -> RgbImage {
    let (h, w) = (map.len(), map[0].len());
    let max = map.iter().flatten().fold(f32::MIN_POSITIVE, |m, &v| m.max(v));
    RgbImage::from_fn(PANEL, PANEL, |x, y| {
        let v = map[y as usize * h / PANEL as usize][x as usize * w / PANEL as usize] / max;
        let t = v.clamp(0.0, 1.0);
        Rgb([
            (255.0 * (2.0 * t).min(1.0)) as u8,
            (255.0 * (2.0 * t - 1.0).max(0.0)) as u8,
            (255.0 * (1.0 - 2.0 * t).max(0.0) * 0.6) as u8,
        ])
    })
}

/// Copies `panel` into `figure` with its top-left corner at `(left, top)`.
pub fn paste_at(figure: &mut RgbImage, (left, top): (u32, u32), panel: &RgbImage) {
    for (x, y, px) in panel.enumerate_pixels() {
        figure.put_pixel(left + x, top + y, *px);
    }
}

fn paste(figure: &mut RgbImage, left: u32, panel: &RgbImage) {
    for (x, y, px) in panel.enumerate_pixels() {
        figure.put_pixel(left + x, y, *px);
    }
}
