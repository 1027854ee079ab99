//! The loader: seeded shuffling, decoding and augmentation on worker threads, batches prefetched
//! while the model trains.
//!
//! Determinism does not depend on the number of threads: the order of an epoch is a function of
//! `(seed, epoch)`, and the augmentation of an item draws from its own generator seeded by
//! `(seed, epoch, item)`. Threads only change who computes what.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::transform::Pipeline;

/// How batches are drawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Items per batch.
    pub batch_size: usize,
    /// Shuffle the order every epoch (training) or keep the dataset order (evaluation).
    pub shuffle: bool,
    /// Drop the last, smaller batch.
    pub drop_last: bool,
    /// The seed of the order and of the augmentations.
    pub seed: u64,
    /// Worker threads that decode and augment.
    pub threads: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Self { batch_size: 128, shuffle: true, drop_last: false, seed: 0, threads, prefetch: 2 }
    }
}

/// A batch: images `[B, C, H, W]` (f32, normalised) and labels `[B]` (u32) on the loader's
/// device, and the dataset indices they came from.
#[derive(Debug)]
pub struct Batch {
    /// `[B, C, H, W]`, f32.
    pub images: Tensor,
    /// `[B]`, u32.
    pub labels: Tensor,
    /// The dataset index of each item.
    pub indices: Vec<usize>,
    /// Where these items start in the whole batch (0 unless the loader serves a [`Share`]).
    pub offset: usize,
    /// The whole batch's items, of which these are the share (its own length unless the
    /// loader serves a [`Share`]).
    pub whole: usize,
}

/// The part of every batch one of several consumers takes (a rank of a data-parallel job):
/// part `index` of `of` contiguous parts, their sizes differing by one at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Which part, from 0.
    pub index: usize,
    /// Of how many.
    pub of: usize,
}

impl Share {
    /// The whole batch.
    pub const WHOLE: Share = Share { index: 0, of: 1 };

    /// The range of a batch of `len` items this share takes.
    pub fn range(self, len: usize) -> std::ops::Range<usize> {
        let of = self.of.max(1);
        len * self.index / of..len * (self.index + 1) / of
    }
}

/// Draws batches of a dataset through a pipeline.
#[derive(Clone)]
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    pipeline: Arc<Pipeline>,
    config: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
}

impl Loader {
    /// A loader with its own pool of `config.threads` workers.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        pipeline: Pipeline,
        config: LoaderConfig,
    ) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::format(dataset.name(), "the batch size must be at least 1"));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads.max(1))
            .thread_name(|i| format!("at-data-{i}"))
            .build()
            .map_err(|e| {
                Error::format(dataset.name(), format!("cannot start the loader's threads: {e}"))
            })?;
        Ok(Self { dataset, pipeline: Arc::new(pipeline), config, pool: Arc::new(pool) })
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.config.batch_size);
        if self.config.drop_last { n / b } else { n.div_ceil(b) }
    }

    /// The dataset indices of epoch `epoch`, in the order they are served.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(self.config.seed, epoch)));
        }
        order
    }

    /// The batches of epoch `epoch`, prepared in the background, on `device`.
    pub fn epoch(&self, epoch: u64, device: &Device) -> Batches {
        self.epoch_from(epoch, 0, device)
    }

    /// The batches of epoch `epoch` from batch `start` on: what a resumed run continues with.
    pub fn epoch_from(&self, epoch: u64, start: usize, device: &Device) -> Batches {
        self.share_from(epoch, start, device, Share::WHOLE)
    }

    /// `share` of every batch of epoch `epoch` from batch `start` on: only those items are
    /// decoded; each keeps the order, augmentation and place it has in the whole batch.
    pub fn share_from(&self, epoch: u64, start: usize, device: &Device, share: Share) -> Batches {
        let order = self.order(epoch);
        let b = self.config.batch_size;
        // (first item, end, the whole batch's length, the share's offset in it)
        let ranges: Vec<(usize, usize, usize, usize)> = (start..self.batches_per_epoch())
            .map(|i| {
                let (lo, hi) = (i * b, ((i + 1) * b).min(order.len()));
                let part = share.range(hi - lo);
                (lo + part.start, lo + part.end, hi - lo, part.start)
            })
            .collect();
        let (tx, rx) = sync_channel(self.config.prefetch.max(1));
        let this = self.clone();
        let producer = std::thread::Builder::new()
            .name("at-data-producer".into())
            .spawn(move || {
                for (lo, hi, whole, offset) in ranges {
                    let batch = this.prepare(epoch, &order[lo..hi]).map(|mut batch| {
                        (batch.offset, batch.whole) = (offset, whole);
                        batch
                    });
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        return; // The consumer is gone, or told of the error.
                    }
                }
            })
            .expect("the producer thread starts");
        Batches { rx, producer: Some(producer), device: device.clone() }
    }

    /// Decodes and augments the items `indices` on the pool: the CPU side of a batch.
    fn prepare(&self, epoch: u64, indices: &[usize]) -> Result<CpuBatch> {
        if indices.is_empty() {
            // A share of a batch smaller than the number of shares: nothing to decode.
            let empty = CpuBatch {
                pixels: vec![],
                shape: (0, 0, 0, 0),
                labels: vec![],
                indices: vec![],
                offset: 0,
                whole: 0,
            };
            return Ok(empty);
        }
        let seed = mix(self.config.seed, epoch);
        let items: Vec<Result<Prepared>> = self.pool.install(|| {
            indices
                .par_iter()
                .map(|&index| {
                    let (image, label) = self.dataset.get(index)?;
                    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, index as u64));
                    let image = self.pipeline.augment(&image, &mut rng);
                    let shape = (image.channels, image.height, image.width);
                    let mut values = vec![0f32; image.data.len()];
                    self.pipeline.normalize_into(&image, &mut values);
                    Ok(Prepared { values, shape, label: label as u32 })
                })
                .collect()
        });
        let mut shape = None;
        let mut pixels = Vec::new();
        let mut labels = Vec::with_capacity(indices.len());
        for (item, &index) in items.into_iter().zip(indices) {
            let Prepared { values, shape: item_shape, label } = item?;
            match shape {
                None => {
                    shape = Some(item_shape);
                    pixels.reserve(values.len() * indices.len());
                }
                Some(s) if s != item_shape => {
                    let message = format!(
                        "item {index} comes out as {item_shape:?} (channels, height, width) after augmentation, \
                         not {s:?} like the rest of its batch: add a crop or resize to the pipeline"
                    );
                    return Err(Error::format(self.dataset.name(), message));
                }
                Some(_) => {}
            }
            pixels.extend_from_slice(&values);
            labels.push(label);
        }
        let (c, h, w) = shape.expect("a batch has at least one item");
        let n = indices.len();
        let indices = indices.to_vec();
        Ok(CpuBatch { pixels, shape: (n, c, h, w), labels, indices, offset: 0, whole: n })
    }
}

/// One item, augmented and normalised: `values` in channel-row-column order.
struct Prepared {
    values: Vec<f32>,
    shape: (usize, usize, usize),
    label: u32,
}

struct CpuBatch {
    pixels: Vec<f32>,
    shape: (usize, usize, usize, usize),
    labels: Vec<u32>,
    indices: Vec<usize>,
    offset: usize,
    whole: usize,
}

/// The batches of one epoch, in order; see [`Loader::epoch`].
pub struct Batches {
    rx: Receiver<Result<CpuBatch>>,
    producer: Option<JoinHandle<()>>,
    device: Device,
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = match self.rx.recv() {
            Ok(batch) => batch,
            Err(_) => {
                if let Some(producer) = self.producer.take() {
                    let _ = producer.join();
                }
                return None;
            }
        };
        Some(batch.and_then(|b| {
            let n = b.labels.len();
            let images =
                Tensor::from_vec(b.pixels, b.shape, &Device::Cpu)?.to_device(&self.device)?;
            let labels = Tensor::from_vec(b.labels, n, &Device::Cpu)?.to_device(&self.device)?;
            Ok(Batch { images, labels, indices: b.indices, offset: b.offset, whole: b.whole })
        }))
    }
}

/// Mixes two words into a seed (SplitMix64 of their combination).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
