//! The datasets a run can use, with their pipelines.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use at_data::{Augment, Dataset, Image, Pipeline, Split, cifar, mnist};

use crate::config::DataConfig;

/// The datasets `data.dataset` accepts.
pub const DATASETS: &[&str] =
    &["fashion-mnist-subset", "fashion-mnist", "cifar10", "cifar10-parquet"];

/// Both splits with their pipelines.
pub struct Data {
    /// The training set.
    pub train: Arc<dyn Dataset>,
    /// The test set.
    pub test: Arc<dyn Dataset>,
    /// The training augmentation.
    pub train_pipeline: Pipeline,
    /// The evaluation pipeline.
    pub test_pipeline: Pipeline,
    /// Image channels.
    pub in_channels: usize,
}

/// An error listing the known datasets, or the augmentations, when the config names another.
pub fn check_dataset(config: &DataConfig) -> Result<()> {
    if !DATASETS.contains(&config.dataset.as_str()) {
        bail!("unknown dataset `{}`; known datasets: {}", config.dataset, DATASETS.join(", "))
    }
    if !["standard", "flip", "none"].contains(&config.augment.as_str()) {
        bail!("data.augment must be standard, flip or none, not `{}`", config.augment)
    }
    Ok(())
}

/// Loads the datasets of `config`.
pub fn load(config: &DataConfig) -> Result<Data> {
    check_dataset(config)?;
    let root = |default: &str| {
        if config.root.as_os_str().is_empty() {
            Path::new(default).to_path_buf()
        } else {
            config.root.clone()
        }
    };
    let (train, test, train_pipeline, test_pipeline, in_channels): (
        at_data::InMemory,
        at_data::InMemory,
        _,
        _,
        _,
    ) = match config.dataset.as_str() {
        "fashion-mnist-subset" => (
            mnist::embedded(Split::Train)?,
            mnist::embedded(Split::Test)?,
            Pipeline::fashion_mnist_train(),
            Pipeline::fashion_mnist_test(),
            1,
        ),
        "fashion-mnist" => {
            let dir = root(mnist::DEBIAN_DIR);
            (
                mnist::load(&dir, Split::Train)?,
                mnist::load(&dir, Split::Test)?,
                Pipeline::fashion_mnist_train(),
                Pipeline::fashion_mnist_test(),
                1,
            )
        }
        "cifar10" => {
            let dir = root("data/cifar10");
            (
                cifar::load_binary(&dir, Split::Train)?,
                cifar::load_binary(&dir, Split::Test)?,
                Pipeline::cifar_train(),
                Pipeline::cifar_test(),
                3,
            )
        }
        "cifar10-parquet" => {
            let dir = root("data/cifar10");
            (
                cifar::load_parquet(&dir, Split::Train)?,
                cifar::load_parquet(&dir, Split::Test)?,
                Pipeline::cifar_train(),
                Pipeline::cifar_test(),
                3,
            )
        }
        _ => unreachable!("checked above"),
    };
    let train_pipeline = match config.augment.as_str() {
        "standard" => train_pipeline,
        "flip" => Pipeline { augment: Augment::Flip, ..test_pipeline.clone() },
        _ => test_pipeline.clone(),
    };
    Ok(Data {
        train: limit(train, config.train_limit),
        test: limit(test, config.test_limit),
        train_pipeline,
        test_pipeline,
        in_channels,
    })
}

fn limit(data: at_data::InMemory, n: usize) -> Arc<dyn Dataset> {
    if n == 0 || n >= data.len() {
        return Arc::new(data);
    }
    let indices: Vec<usize> = (0..n).collect();
    Arc::new(data.select(format!("{} (first {n})", data.name()), &indices))
}

/// Decodes one image file for `at-train maps`.
pub fn open_image(path: &Path) -> Result<Image> {
    Ok(Image::open(path)?)
}
