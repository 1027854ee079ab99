//! The datasets a run can use, with their pipelines.

use std::path::Path;
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
    let fmnist = (Pipeline::fashion_mnist_train(), Pipeline::fashion_mnist_test(), 1);
    let cifar = (Pipeline::cifar_train(), Pipeline::cifar_test(), 3);
    let finetune = (Pipeline::finetune_train(), Pipeline::finetune_eval(), 3);
    let imagenet = (Pipeline::imagenet_train(), Pipeline::imagenet_eval(), 3);
    let ((train, test), (train_pipeline, test_pipeline, in_channels)) = match config.dataset {
        DatasetName::FashionMnistSubset => (both(&|s| boxed(mnist::embedded(s)))?, fmnist),
        DatasetName::FashionMnist => {
            let dir = root(mnist::DEBIAN_DIR);
            (both(&|s| boxed(mnist::load(&dir, s)))?, fmnist)
        }
        DatasetName::Cifar10 => {
            let dir = root("data/cifar10");
            (both(&|s| boxed(cifar::load_binary(&dir, s)))?, cifar)
        }
        DatasetName::Cifar10Parquet => {
            let dir = root("data/cifar10");
            (both(&|s| boxed(cifar::load_parquet(&dir, s)))?, cifar)
        }
        DatasetName::Cub => {
            let dir = root("data/cub");
            (both(&|s| boxed(folder::cub(&dir, s)))?, finetune)
        }
        DatasetName::Scenes => {
            let dir = root("data/scenes");
            (both(&|s| boxed(folder::scenes(&dir, s)))?, finetune)
        }
        DatasetName::Imagenet => {
            let dir = root("data/imagenet");
            (both(&|s| boxed(folder::imagenet(&dir, s)))?, imagenet)
        }
        DatasetName::ImagenetParquet => {
            let dir = root("data/imagenet");
            (both(&|s| boxed(folder::imagenet_parquet(&dir, s)))?, imagenet)
        }
    };
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
