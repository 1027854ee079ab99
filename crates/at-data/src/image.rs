//! The in-memory image every dataset yields: 8-bit, interleaved (row, column, channel).

use std::path::Path;

use crate::error::{Error, Result};

/// An 8-bit image stored row-major with interleaved channels, as the `image` crate stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// `height * width * channels` bytes; the value at `(row, col, ch)` is at
    /// `(row * width + col) * channels + ch`.
    pub data: Vec<u8>,
}

impl Image {
    /// An image from interleaved bytes.
    pub fn new(height: usize, width: usize, channels: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), height * width * channels, "image buffer of the wrong size");
        Self { height, width, channels, data }
    }

    /// An image from planar bytes (all of channel 0, then channel 1, ...), as CIFAR stores it.
    pub fn from_planar(height: usize, width: usize, channels: usize, planar: &[u8]) -> Self {
        let plane = height * width;
        let mut data = vec![0; plane * channels];
        for c in 0..channels {
            for (i, &v) in planar[c * plane..(c + 1) * plane].iter().enumerate() {
                data[i * channels + c] = v;
            }
        }
        Self { height, width, channels, data }
    }

    /// The value at `(row, col, ch)`.
    pub fn at(&self, row: usize, col: usize, ch: usize) -> u8 {
        self.data[(row * self.width + col) * self.channels + ch]
    }

    /// Decodes a JPEG or PNG (any colour type, converted to RGB, or kept grey when `grey`).
    /// `origin` names the file (or container and item) in errors.
    pub fn decode(bytes: &[u8], origin: &Path, grey: bool) -> Result<Self> {
        let decoded = image::load_from_memory(bytes)
            .map_err(|source| Error::Image { path: origin.to_path_buf(), source })?;
        if decoded.width() == 0 || decoded.height() == 0 {
            return Err(Error::format(origin, "an empty image"));
        }
        Ok(if grey {
            Self::from_luma(decoded.into_luma8())
        } else {
            Self::from_rgb(decoded.into_rgb8())
        })
    }

    /// Opens and decodes an image file as RGB.
    pub fn open(path: &Path) -> Result<Self> {
        Self::decode(&crate::error::read(path)?, path, false)
    }

    /// Takes the buffer of an RGB image.
    pub fn from_rgb(img: image::RgbImage) -> Self {
        let (w, h) = img.dimensions();
        Self::new(h as usize, w as usize, 3, img.into_raw())
    }

    /// Takes the buffer of a grey image.
    pub fn from_luma(img: image::GrayImage) -> Self {
        let (w, h) = img.dimensions();
        Self::new(h as usize, w as usize, 1, img.into_raw())
    }

    /// The `h x w` region whose top-left corner is `(top, left)`; it must lie inside the image.
    pub fn crop(&self, top: usize, left: usize, h: usize, w: usize) -> Self {
        assert!(top + h <= self.height && left + w <= self.width, "crop outside the image");
        let c = self.channels;
        let mut data = Vec::with_capacity(h * w * c);
        for row in top..top + h {
            let start = (row * self.width + left) * c;
            data.extend_from_slice(&self.data[start..start + w * c]);
        }
        Self::new(h, w, c, data)
    }

    /// Resizes to `h x w` with a bilinear (triangle) filter.
    pub fn resize(&self, h: usize, w: usize) -> Self {
        if (h, w) == (self.height, self.width) {
            return self.clone();
        }
        let data = match self.channels {
            1 => self.resized_buffer::<image::Luma<u8>>(h, w),
            _ => self.resized_buffer::<image::Rgb<u8>>(h, w),
        };
        Self::new(h, w, self.channels, data)
    }

    /// The pixels resized with a bilinear (triangle) filter, read as pixels of type `P`.
    fn resized_buffer<P: image::Pixel<Subpixel = u8> + 'static>(
        &self,
        h: usize,
        w: usize,
    ) -> Vec<u8> {
        let img = image::ImageBuffer::<P, Vec<u8>>::from_raw(
            self.width as u32,
            self.height as u32,
            self.data.clone(),
        )
        .expect("the buffer holds height * width pixels");
        image::imageops::resize(&img, w as u32, h as u32, image::imageops::FilterType::Triangle)
            .into_raw()
    }
}
