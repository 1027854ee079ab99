//! CIFAR-10 from its binary batches or from the Hugging Face Hub's parquet files.
//!
//! Binary: `data_batch_1.bin` .. `data_batch_5.bin` (train) and `test_batch.bin` (test), records of
//! 3073 bytes: the label, then the red, green and blue planes, each 32x32 row-major.
//! Parquet (`uoft-cs/cifar10`): `plain_text/{train,test}-00000-of-00001.parquet`, columns `img`
//! (a struct with the PNG `bytes`) and `label`. Both give the same images, the right way up.

use std::path::{Path, PathBuf};

use crate::dataset::InMemory;
use crate::error::{Error, Result, read};
use crate::image::Image;

/// The CIFAR-10 class names, in label order.
pub const CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

const SIDE: usize = 32;
const RECORD: usize = 1 + 3 * SIDE * SIDE;

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training set.
    Train,
    /// The test (or validation) set.
    Test,
}

impl Split {
    /// `train` or `test`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

fn binary_files(split: Split) -> Vec<String> {
    match split {
        Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        Split::Test => vec!["test_batch.bin".to_owned()],
    }
}

/// Loads a split from the binary batches in `dir` (or in `dir/cifar-10-batches-bin`).
pub fn load_binary(dir: &Path, split: Split) -> Result<InMemory> {
    let nested = dir.join("cifar-10-batches-bin");
    let dir = if nested.is_dir() { nested } else { dir.to_path_buf() };
    let files = binary_files(split);
    if !dir.join(&files[0]).is_file() {
        return Err(Error::Missing {
            what: format!("CIFAR-10 binary batches ({})", files.join(", ")),
            path: dir,
            hint: "run `cargo xtask download cifar10`, or unpack cifar-10-binary.tar.gz there"
                .into(),
        });
    }
    let mut parts = Vec::with_capacity(files.len());
    for file in files {
        parts.push(parse_binary(&dir.join(file))?);
    }
    Ok(InMemory::concat(format!("cifar10/{}", split.as_str()), parts))
}

/// Parses one binary batch file.
pub fn parse_binary(path: &Path) -> Result<InMemory> {
    let bytes = read(path)?;
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        let records = bytes.len().div_ceil(RECORD).max(1);
        return Err(Error::Size {
            path: path.into(),
            expected: (records * RECORD) as u64,
            actual: bytes.len() as u64,
        });
    }
    let n = bytes.len() / RECORD;
    let mut pixels = Vec::with_capacity(n * (RECORD - 1));
    let mut labels = Vec::with_capacity(n);
    for (index, record) in bytes.chunks_exact(RECORD).enumerate() {
        let label = record[0];
        if label as usize >= CLASSES.len() {
            return Err(Error::BadLabel {
                path: path.into(),
                index,
                value: label as i64,
                classes: CLASSES.len(),
            });
        }
        labels.push(label);
        pixels.extend_from_slice(&Image::from_planar(SIDE, SIDE, 3, &record[1..]).data);
    }
    let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(InMemory::new(name, (SIDE, SIDE, 3), CLASSES.len(), pixels, labels))
}

/// The parquet file of a split in the Hub's layout, under a dataset snapshot directory.
pub fn parquet_path(root: &Path, split: Split) -> PathBuf {
    root.join("plain_text").join(format!("{}-00000-of-00001.parquet", split.as_str()))
}

/// Loads a split from the Hub's parquet layout under `root` (the dataset snapshot directory).
pub fn load_parquet(root: &Path, split: Split) -> Result<InMemory> {
    let path = parquet_path(root, split);
    if !path.is_file() {
        return Err(Error::Missing {
            what: "CIFAR-10 parquet file".into(),
            path,
            hint: "run `cargo xtask download cifar10`".into(),
        });
    }
    parse_parquet(&path)
}

/// Decodes every row of a CIFAR-10 parquet file (`img.bytes` PNG, `label`).
pub fn parse_parquet(path: &Path) -> Result<InMemory> {
    let (pixels, labels) =
        crate::parquet::decode_images(path, ("img", "label"), (SIDE, false), CLASSES.len())?;
    let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(InMemory::new(name, (SIDE, SIDE, 3), CLASSES.len(), pixels, labels))
}
