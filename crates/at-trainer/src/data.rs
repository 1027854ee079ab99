//! The datasets a run can use, with their pipelines.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use at_data::{Augment, Dataset, Image, Pipeline, Split, cifar, folder, mnist};

use crate::config::{Augmentation, DataConfig, DatasetName};

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

/// Loads the datasets of `config`.
pub fn load(config: &DataConfig) -> Result<Data> {
    let root = |default: &str| {
        if config.root.as_os_str().is_empty() {
            Path::new(default).to_path_buf()
        } else {
            config.root.clone()
        }
    };
    let both = |f: &dyn Fn(Split) -> at_data::Result<Arc<dyn Dataset>>| -> Result<(Arc<dyn Dataset>, Arc<dyn Dataset>)> {
        Ok((f(Split::Train)?, f(Split::Test)?))
    };
    fn boxed<D: Dataset + 'static>(d: at_data::Result<D>) -> at_data::Result<Arc<dyn Dataset>> {
        d.map(|d| Arc::new(d) as Arc<dyn Dataset>)
    }
    let (train, test) = match config.dataset {
        DatasetName::FashionMnistSubset => both(&|s| boxed(mnist::embedded(s)))?,
        DatasetName::FashionMnist => {
            let dir = match config.root.as_os_str().is_empty() {
                true => fashion_mnist_dir(),
                false => config.root.clone(),
            };
            both(&|s| boxed(mnist::load(&dir, s)))?
        }
        DatasetName::Cifar10 => {
            let dir = root("data/cifar10");
            both(&|s| boxed(cifar::load_binary(&dir, s)))?
        }
        DatasetName::Cifar10Parquet => {
            let dir = root("data/cifar10");
            both(&|s| boxed(cifar::load_parquet(&dir, s)))?
        }
        DatasetName::Cub => {
            let dir = root("data/cub");
            both(&|s| boxed(folder::cub(&dir, s)))?
        }
        DatasetName::Scenes => {
            let dir = root("data/scenes");
            both(&|s| boxed(folder::scenes(&dir, s)))?
        }
        DatasetName::Imagenet => {
            let dir = root("data/imagenet");
            both(&|s| boxed(folder::imagenet(&dir, s)))?
        }
        DatasetName::ImagenetParquet => {
            let dir = root("data/imagenet");
            both(&|s| boxed(folder::imagenet_parquet(&dir, s)))?
        }
    };
    let (train_pipeline, test_pipeline, in_channels) = pipelines(config);
    let train_pipeline = match config.augment {
        Augmentation::Standard => train_pipeline,
        Augmentation::Flip => Pipeline { augment: Augment::Flip, ..test_pipeline.clone() },
        Augmentation::None => test_pipeline.clone(),
    };
    Ok(Data {
        train: limit(train, config.train_limit),
        test: limit(test, config.test_limit),
        train_pipeline,
        test_pipeline,
        in_channels,
    })
}

/// The training and evaluation pipelines of `data`'s dataset at its size (`data.side`) before
/// `data.augment` is applied, and its images' channels.
pub fn pipelines(data: &DataConfig) -> (Pipeline, Pipeline, usize) {
    match data.dataset {
        DatasetName::FashionMnistSubset | DatasetName::FashionMnist => {
            let side = input_side(data);
            (Pipeline::fashion_mnist_train_at(side), Pipeline::fashion_mnist_test_at(side), 1)
        }
        DatasetName::Cifar10 | DatasetName::Cifar10Parquet => {
            (Pipeline::cifar_train(), Pipeline::cifar_test(), 3)
        }
        DatasetName::Cub | DatasetName::Scenes => {
            (Pipeline::finetune_train(), Pipeline::finetune_eval(), 3)
        }
        DatasetName::Imagenet | DatasetName::ImagenetParquet => {
            (Pipeline::imagenet_train(), Pipeline::imagenet_eval(), 3)
        }
    }
}

/// The side of the square images `data`'s pipelines give the network: Fashion-MNIST's
/// `data.side` (32 when unset, padded as CIFAR), 32 for CIFAR-10, 224 for the ImageNet-sized
/// datasets.
pub fn input_side(data: &DataConfig) -> usize {
    match data.dataset {
        DatasetName::FashionMnistSubset | DatasetName::FashionMnist if data.side != 0 => {
            data.side.max(28)
        }
        DatasetName::FashionMnistSubset
        | DatasetName::FashionMnist
        | DatasetName::Cifar10
        | DatasetName::Cifar10Parquet => 32,
        DatasetName::Cub
        | DatasetName::Scenes
        | DatasetName::Imagenet
        | DatasetName::ImagenetParquet => 224,
    }
}

/// The class names of `dataset`, where they are fixed (CIFAR-10, Fashion-MNIST).
pub fn class_names(dataset: DatasetName) -> Option<&'static [&'static str]> {
    match dataset {
        DatasetName::FashionMnistSubset | DatasetName::FashionMnist => Some(&mnist::CLASSES),
        DatasetName::Cifar10 | DatasetName::Cifar10Parquet => Some(&cifar::CLASSES),
        _ => None,
    }
}

/// Where Fashion-MNIST is when no folder is given: Debian's package folder if it holds the
/// files, else the Hub cache's copy if `cargo xtask download fashion-mnist` made one, else
/// Debian's folder (whose error says both ways to get it).
fn fashion_mnist_dir() -> PathBuf {
    let debian = Path::new(mnist::DEBIAN_DIR);
    if debian.join("train-images-idx3-ubyte.gz").is_file() {
        return debian.to_path_buf();
    }
    let source = at_data::hub::Source::fashion_mnist();
    at_data::hub::cached(&source, &at_data::hub::HubOptions::from_env())
        .unwrap_or_else(|| debian.to_path_buf())
}

/// The first `n` items of a dataset (all when `n` is 0).
struct Limited {
    inner: Arc<dyn Dataset>,
    name: String,
    n: usize,
}

impl Dataset for Limited {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.n
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn get(&self, index: usize) -> at_data::Result<(Image, usize)> {
        self.inner.get(index)
    }
}

fn limit(data: Arc<dyn Dataset>, n: usize) -> Arc<dyn Dataset> {
    if n == 0 || n >= data.len() {
        return data;
    }
    Arc::new(Limited { name: format!("{} (first {n})", data.name()), inner: data, n })
}
