//! The datasets of "Paying More Attention to Attention" for candle, behind a fast seeded loader.
//!
//! - [`cifar`]: CIFAR-10 from its binary batches or from the Hub's parquet files.
//! - [`mnist`]: Fashion-MNIST from IDX files, and a stratified subset embedded in this crate
//!   ([`mnist::embedded`]): real data with no file and no network.
//! - [`folder`]: CUB-200-2011 (cropped to the bird), MIT Indoor 67 and ImageNet folders, and
//!   ImageNet in the Hub's parquet shards ([`parquet::ParquetImages`], decoded on demand).
//! - [`transform`]: the paper's augmentations and normalisations ([`Pipeline`]).
//! - [`loader`]: batches on any device, shuffled by seed, decoded and augmented on worker threads
//!   and prefetched; the same seed gives the same batches whatever the number of threads.
//! - [`hub`]: downloads from the Hugging Face Hub, the only code here that touches the network.
//!
//! ```
//! use std::sync::Arc;
//! use at_data::{Loader, LoaderConfig, Pipeline, Split, mnist};
//! use candle_core::Device;
//!
//! # fn main() -> at_data::Result<()> {
//! let train = Arc::new(mnist::embedded(Split::Train)?);
//! let config = LoaderConfig { batch_size: 64, seed: 7, ..LoaderConfig::default() };
//! let loader = Loader::new(train, Pipeline::fashion_mnist_train(), config)?;
//! let batch = loader.epoch(0, &Device::Cpu).next().unwrap()?;
//! assert_eq!(batch.images.dims(), &[64, 1, 32, 32]);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod cifar;
mod dataset;
mod error;
pub mod folder;
pub mod hub;
mod image;
pub mod loader;
pub mod mnist;
pub mod parquet;
pub mod transform;

pub use cifar::Split;
pub use dataset::{Dataset, InMemory};
pub use error::{Error, Result};
pub use image::Image;
pub use loader::{Batch, Batches, Loader, LoaderConfig, Share};
pub use transform::{Augment, Pipeline};
