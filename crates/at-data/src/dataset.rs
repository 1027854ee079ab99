//! The dataset abstraction and the in-memory dataset the small datasets load into.

use crate::error::Result;
use crate::image::Image;

/// A labelled image dataset with random access. Implementations are shared between the loader's
/// worker threads, so `get` takes `&self`.
pub trait Dataset: Send + Sync {
    /// A short name for messages, e.g. `cifar10/train`.
    fn name(&self) -> &str;
    /// The number of items.
    fn len(&self) -> usize;
    /// Whether there are no items.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The number of classes; labels are in `0..num_classes()`.
    fn num_classes(&self) -> usize;
    /// The image and label of item `index` (`index < len()`), decoded.
    fn get(&self, index: usize) -> Result<(Image, usize)>;
}

/// Images of one size held decoded in memory: CIFAR-10, Fashion-MNIST, the embedded subset.
#[derive(Clone, Debug)]
pub struct InMemory {
    name: String,
    height: usize,
    width: usize,
    channels: usize,
    classes: usize,
    /// `len * height * width * channels` bytes, each image interleaved as [`Image::data`].
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

impl InMemory {
    /// A dataset from interleaved pixels and labels already checked to be `< classes`.
    pub fn new(
        name: impl Into<String>,
        (height, width, channels): (usize, usize, usize),
        classes: usize,
        pixels: Vec<u8>,
        labels: Vec<u8>,
    ) -> Self {
        assert_eq!(
            pixels.len(),
            labels.len() * height * width * channels,
            "pixels for every label"
        );
        Self { name: name.into(), height, width, channels, classes, pixels, labels }
    }

    /// The labels, in item order.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// `(height, width, channels)` of every image.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        (self.height, self.width, self.channels)
    }

    /// The items `indices` as a new dataset (a subset or a reordering).
    pub fn select(&self, name: impl Into<String>, indices: &[usize]) -> Self {
        let size = self.height * self.width * self.channels;
        let mut pixels = Vec::with_capacity(indices.len() * size);
        for &i in indices {
            pixels.extend_from_slice(&self.pixels[i * size..(i + 1) * size]);
        }
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        Self { name: name.into(), pixels, labels, ..self.clone() }
    }

    /// All items of `parts`, in order, as one dataset. They must share image shape and classes.
    pub fn concat(name: impl Into<String>, parts: Vec<InMemory>) -> Self {
        let mut iter = parts.into_iter();
        let mut first = iter.next().expect("at least one part");
        for part in iter {
            assert_eq!(part.image_shape(), first.image_shape(), "parts of one image shape");
            first.pixels.extend_from_slice(&part.pixels);
            first.labels.extend_from_slice(&part.labels);
        }
        first.name = name.into();
        first
    }
}

impl Dataset for InMemory {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.classes
    }

    fn get(&self, index: usize) -> Result<(Image, usize)> {
        let size = self.height * self.width * self.channels;
        let data = self.pixels[index * size..(index + 1) * size].to_vec();
        Ok((Image::new(self.height, self.width, self.channels, data), self.labels[index] as usize))
    }
}
