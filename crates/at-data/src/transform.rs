//! Augmentations and normalisation: from a decoded [`Image`] to the f32 channel-row-column values
//! a network takes.

use rand::Rng;

use crate::image::Image;

/// CIFAR-10 per-channel mean, as the authors' code (`[125.3, 123.0, 113.9] / 255`).
pub const CIFAR_MEAN: [f32; 3] = [125.3 / 255.0, 123.0 / 255.0, 113.9 / 255.0];
/// CIFAR-10 per-channel standard deviation (`[63.0, 62.1, 66.7] / 255`).
pub const CIFAR_STD: [f32; 3] = [63.0 / 255.0, 62.1 / 255.0, 66.7 / 255.0];
/// ImageNet per-channel mean.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet per-channel standard deviation.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Fashion-MNIST mean of the training set.
pub const FASHION_MNIST_MEAN: [f32; 1] = [0.2860];
/// Fashion-MNIST standard deviation of the training set.
pub const FASHION_MNIST_STD: [f32; 1] = [0.3530];

/// The random (or fixed) geometric part of a pipeline.
#[derive(Clone, Debug, PartialEq)]
pub enum Augment {
    /// Nothing.
    None,
    /// A random horizontal flip only (the gradient-AT experiments, Table 3).
    Flip,
    /// Reflect-pad by `pad`, take a random `crop x crop` window, flip at random: CIFAR training.
    PadCropFlip {
        /// Reflection padding on every side.
        pad: usize,
        /// The crop side.
        crop: usize,
    },
    /// torchvision's `RandomResizedCrop(size, scale, ratio)` and a random flip: ImageNet training.
    RandomResizedCrop {
        /// The output side.
        size: usize,
        /// Range of the crop's area as a fraction of the image's.
        scale: (f64, f64),
        /// Range of the crop's aspect ratio (width / height).
        ratio: (f64, f64),
    },
    /// Resize the short side to `short`, then a random `crop x crop` window and a random flip:
    /// fine-tuning on CUB and Scenes.
    ShortSideRandomCrop {
        /// The short side after resizing.
        short: usize,
        /// The crop side.
        crop: usize,
    },
    /// Resize the short side to `short`, then the central `crop x crop` window: evaluation.
    ShortSideCenterCrop {
        /// The short side after resizing.
        short: usize,
        /// The crop side.
        crop: usize,
    },
}

/// What turns a dataset item into network input: optional zero padding to a square size, an
/// augmentation, and per-channel normalisation `(x / 255 - mean) / std`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    /// Zero-pad (centred) to this side first, e.g. Fashion-MNIST's 28 to the WRN's 32.
    pub pad_to: Option<usize>,
    /// The geometric augmentation.
    pub augment: Augment,
    /// Per-channel mean of `x / 255`.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of `x / 255`.
    pub std: Vec<f32>,
}

/// The padding that brings Fashion-MNIST's 28x28 images to `side`.
fn fashion_mnist_pad(side: usize) -> Option<usize> {
    assert!(side >= 28, "Fashion-MNIST's images are 28x28: a side of {side} would crop them");
    (side > 28).then_some(side)
}

impl Pipeline {
    /// CIFAR training: reflect-pad 4, random 32x32 crop, flip, the paper's mean and std.
    pub fn cifar_train() -> Self {
        Self::new(None, Augment::PadCropFlip { pad: 4, crop: 32 }, &CIFAR_MEAN, &CIFAR_STD)
    }

    /// CIFAR evaluation: normalisation only.
    pub fn cifar_test() -> Self {
        Self::new(None, Augment::None, &CIFAR_MEAN, &CIFAR_STD)
    }

    /// Fashion-MNIST for CIFAR networks, training: zero-pad 28 to 32, then as CIFAR.
    pub fn fashion_mnist_train() -> Self {
        Self::fashion_mnist_train_at(32)
    }

    /// Fashion-MNIST evaluation: zero-pad 28 to 32, normalise.
    pub fn fashion_mnist_test() -> Self {
        Self::fashion_mnist_test_at(32)
    }

    /// Fashion-MNIST training at `side` (28: the images as they are; more: zero-padded to it):
    /// reflect-pad 4, random `side x side` crop, flip.
    ///
    /// # Panics
    ///
    /// If `side` is under 28.
    pub fn fashion_mnist_train_at(side: usize) -> Self {
        let crop = Augment::PadCropFlip { pad: 4, crop: side };
        Self::new(fashion_mnist_pad(side), crop, &FASHION_MNIST_MEAN, &FASHION_MNIST_STD)
    }

    /// Fashion-MNIST evaluation at `side` (see [`Pipeline::fashion_mnist_train_at`]).
    ///
    /// # Panics
    ///
    /// If `side` is under 28.
    pub fn fashion_mnist_test_at(side: usize) -> Self {
        Self::new(fashion_mnist_pad(side), Augment::None, &FASHION_MNIST_MEAN, &FASHION_MNIST_STD)
    }

    /// ImageNet training: random-resized crop 224 (scale 0.08-1, ratio 3/4-4/3) and flip.
    pub fn imagenet_train() -> Self {
        let augment = Augment::RandomResizedCrop {
            size: 224,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        };
        Self::new(None, augment, &IMAGENET_MEAN, &IMAGENET_STD)
    }

    /// ImageNet validation: short side 256, centre crop 224.
    pub fn imagenet_eval() -> Self {
        Self::new(
            None,
            Augment::ShortSideCenterCrop { short: 256, crop: 224 },
            &IMAGENET_MEAN,
            &IMAGENET_STD,
        )
    }

    /// Fine-tuning (CUB, Scenes), training: short side 256, random crop 224, flip.
    pub fn finetune_train() -> Self {
        Self::new(
            None,
            Augment::ShortSideRandomCrop { short: 256, crop: 224 },
            &IMAGENET_MEAN,
            &IMAGENET_STD,
        )
    }

    /// Fine-tuning evaluation: short side 256, centre crop 224.
    pub fn finetune_eval() -> Self {
        Self::imagenet_eval()
    }

    fn new(pad_to: Option<usize>, augment: Augment, mean: &[f32], std: &[f32]) -> Self {
        Self { pad_to, augment, mean: mean.to_vec(), std: std.to_vec() }
    }

    /// Applies padding and augmentation, drawing any randomness from `rng`.
    pub fn augment(&self, image: &Image, rng: &mut impl Rng) -> Image {
        let padded;
        let image = match self.pad_to {
            Some(side) if side > image.height || side > image.width => {
                padded = zero_pad_to(image, side);
                &padded
            }
            _ => image,
        };
        match self.augment {
            Augment::None => image.clone(),
            Augment::Flip => maybe_flip(image.clone(), rng),
            Augment::PadCropFlip { pad, crop } => {
                let padded = reflect_pad(image, pad);
                // An image smaller than the crop keeps its size; the loader then reports it.
                let (ch, cw) = (crop.min(padded.height), crop.min(padded.width));
                let top = rng.random_range(0..=padded.height - ch);
                let left = rng.random_range(0..=padded.width - cw);
                maybe_flip(padded.crop(top, left, ch, cw), rng)
            }
            Augment::RandomResizedCrop { size, scale, ratio } => {
                let (top, left, h, w) =
                    random_resized_crop_box(image.height, image.width, scale, ratio, rng);
                maybe_flip(image.crop(top, left, h, w).resize(size, size), rng)
            }
            Augment::ShortSideRandomCrop { short, crop } => {
                let resized = resize_short_side(image, short);
                let top = rng.random_range(0..=resized.height.saturating_sub(crop));
                let left = rng.random_range(0..=resized.width.saturating_sub(crop));
                maybe_flip(
                    resized.crop(top, left, crop.min(resized.height), crop.min(resized.width)),
                    rng,
                )
            }
            Augment::ShortSideCenterCrop { short, crop } => {
                center_crop(&resize_short_side(image, short), crop)
            }
        }
    }

    /// Writes `image` normalised, channel-row-column, into `out` (`channels * height * width`).
    pub fn normalize_into(&self, image: &Image, out: &mut [f32]) {
        let (h, w, c) = (image.height, image.width, image.channels);
        assert_eq!(out.len(), c * h * w, "output buffer of the wrong size");
        assert_eq!(self.mean.len(), c, "a mean per channel");
        for ch in 0..c {
            let scale = 1.0 / (255.0 * self.std[ch]);
            let shift = self.mean[ch] / self.std[ch];
            let plane = &mut out[ch * h * w..(ch + 1) * h * w];
            for (i, v) in plane.iter_mut().enumerate() {
                *v = image.data[i * c + ch] as f32 * scale - shift;
            }
        }
    }
}

/// Flips left-right with probability 1/2.
fn maybe_flip(image: Image, rng: &mut impl Rng) -> Image {
    if rng.random_bool(0.5) { hflip(&image) } else { image }
}

/// The mirror image, left to right.
pub fn hflip(image: &Image) -> Image {
    let c = image.channels;
    let mut data = Vec::with_capacity(image.data.len());
    for row in image.data.chunks_exact(image.width * c) {
        for px in row.chunks_exact(c).rev() {
            data.extend_from_slice(px);
        }
    }
    Image::new(image.height, image.width, c, data)
}

/// Pads by reflection (the edge pixel is not repeated), as `numpy.pad(mode="reflect")`. The
/// padding is capped at one less than the image's sides, the most a reflection can give.
pub fn reflect_pad(image: &Image, pad: usize) -> Image {
    let (h, w, c) = (image.height, image.width, image.channels);
    let pad = pad.min(h.saturating_sub(1)).min(w.saturating_sub(1));
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let i = if i < 0 { -i } else { i };
        (if i >= n { 2 * (n - 1) - i } else { i }) as usize
    };
    let (ph, pw) = (h + 2 * pad, w + 2 * pad);
    let mut data = Vec::with_capacity(ph * pw * c);
    for row in 0..ph {
        let src_row = reflect(row as isize - pad as isize, h);
        for col in 0..pw {
            let src_col = reflect(col as isize - pad as isize, w);
            let start = (src_row * w + src_col) * c;
            data.extend_from_slice(&image.data[start..start + c]);
        }
    }
    Image::new(ph, pw, c, data)
}

/// Centres the image on a zero canvas of `side x side`.
pub fn zero_pad_to(image: &Image, side: usize) -> Image {
    let (h, w, c) = (image.height, image.width, image.channels);
    let (top, left) = (side.saturating_sub(h) / 2, side.saturating_sub(w) / 2);
    let (ph, pw) = (h.max(side), w.max(side));
    let mut data = vec![0; ph * pw * c];
    for row in 0..h {
        let dst = ((row + top) * pw + left) * c;
        data[dst..dst + w * c].copy_from_slice(&image.data[row * w * c..(row + 1) * w * c]);
    }
    Image::new(ph, pw, c, data)
}

/// Resizes so that the short side is `short`, keeping the aspect ratio (the long side is
/// truncated, as torchvision's `Resize(int)`).
pub fn resize_short_side(image: &Image, short: usize) -> Image {
    let (h, w) = (image.height, image.width);
    let (nh, nw) = if h <= w { (short, short * w / h) } else { (short * h / w, short) };
    image.resize(nh, nw)
}

/// The central `crop x crop` window (or the whole side where the image is smaller).
pub fn center_crop(image: &Image, crop: usize) -> Image {
    let (h, w) = (crop.min(image.height), crop.min(image.width));
    image.crop((image.height - h) / 2, (image.width - w) / 2, h, w)
}

/// `(top, left, height, width)` of a random-resized crop, as torchvision draws it: ten tries at
/// an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, then a centre crop with
/// the ratio clamped.
pub fn random_resized_crop_box(
    height: usize,
    width: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let area = (height * width) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (top, left, h, w);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < ratio.0 {
        ((width as f64 / ratio.0).round() as usize, width)
    } else if in_ratio > ratio.1 {
        (height, (height as f64 * ratio.1).round() as usize)
    } else {
        (height, width)
    };
    let (h, w) = (h.clamp(1, height), w.clamp(1, width));
    ((height - h) / 2, (width - w) / 2, h, w)
}
