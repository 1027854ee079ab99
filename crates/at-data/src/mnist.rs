//! Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) from IDX files, gzipped or not, and a stratified
//! subset of it embedded in this crate: real data that needs no file and no network.
//!
//! The embedded subset (`data/fashion-mnist-subset`, made by `data/make_subset.py` from Debian's
//! `dataset-fashion-mnist`) holds the first 1000 training and the first 200 test images of each
//! class, in file order: 10,000 and 2,000 images. Fashion-MNIST is © 2017 Zalando SE, MIT licence;
//! the notice is in `data/fashion-mnist-subset/LICENSE`.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::cifar::Split;
use crate::dataset::InMemory;
use crate::error::{Error, Result, read};

/// The Fashion-MNIST class names, in label order.
pub const CLASSES: [&str; 10] = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

const SIDE: usize = 28;

fn prefix(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Test => "t10k",
    }
}

/// The parquet file of a split in the Hub's layout (`zalando-datasets/fashion_mnist`), under a
/// dataset snapshot directory.
pub fn parquet_path(root: &Path, split: Split) -> PathBuf {
    root.join("fashion_mnist").join(format!("{}-00000-of-00001.parquet", split.as_str()))
}

/// Loads a split from `dir`: the IDX files (`train-images-idx3-ubyte`, with or without `.gz`),
/// or else the Hub's parquet layout (what `cargo xtask download fashion-mnist` fetches).
pub fn load(dir: &Path, split: Split) -> Result<InMemory> {
    let parquet = parquet_path(dir, split);
    let images = dir.join(format!("{}-images-idx3-ubyte", prefix(split)));
    let idx = images.is_file() || images.with_extension("gz").is_file();
    if !idx && parquet.is_file() {
        return parse_parquet(&parquet, split);
    }
    let find = |kind: &str| -> Result<PathBuf> {
        let base = dir.join(format!("{}-{kind}-ubyte", prefix(split)));
        let gz = PathBuf::from(format!("{}.gz", base.display()));
        if base.is_file() {
            Ok(base)
        } else if gz.is_file() {
            Ok(gz)
        } else {
            Err(Error::Missing {
                what: format!("Fashion-MNIST {} {kind}", split.as_str()),
                path: base,
                hint: format!(
                    "neither the IDX files nor {} are there: run `cargo xtask download fashion-mnist` \
                     (or install Debian's dataset-fashion-mnist) and pass the folder it prints, or use the embedded subset",
                    parquet_path(dir, split).display()
                ),
            })
        }
    };
    let images_path = find("images-idx3")?;
    let labels_path = find("labels-idx1")?;
    parse(
        &format!("fashion-mnist/{}", split.as_str()),
        (&images_path, &decompress(&images_path, &read(&images_path)?)?),
        (&labels_path, &decompress(&labels_path, &read(&labels_path)?)?),
    )
}

/// Loads from Debian's package directory.
pub fn load_debian(split: Split) -> Result<InMemory> {
    load(Path::new(DEBIAN_DIR), split)
}

/// The embedded stratified subset: 10,000 training or 2,000 test images.
pub fn embedded(split: Split) -> Result<InMemory> {
    macro_rules! embedded_file {
        ($name:literal) => {
            (
                Path::new(concat!("<embedded>/", $name)),
                &include_bytes!(concat!("../data/fashion-mnist-subset/", $name))[..],
            )
        };
    }
    let (images, labels) = match split {
        Split::Train => (
            embedded_file!("train-images-idx3-ubyte.gz"),
            embedded_file!("train-labels-idx1-ubyte.gz"),
        ),
        Split::Test => (
            embedded_file!("t10k-images-idx3-ubyte.gz"),
            embedded_file!("t10k-labels-idx1-ubyte.gz"),
        ),
    };
    parse(
        &format!("fashion-mnist-subset/{}", split.as_str()),
        (images.0, &decompress(images.0, images.1)?),
        (labels.0, &decompress(labels.0, labels.1)?),
    )
}

/// Decodes a parquet file of the Hub's layout (`image.bytes` PNG, 28x28 grey, and `label`).
pub fn parse_parquet(path: &Path, split: Split) -> Result<InMemory> {
    let (pixels, labels) =
        crate::parquet::decode_images(path, ("image", "label"), (SIDE, true), CLASSES.len())?;
    let name = format!("fashion-mnist/{}", split.as_str());
    Ok(InMemory::new(name, (SIDE, SIDE, 1), CLASSES.len(), pixels, labels))
}

/// Gunzips `bytes` when they start with the gzip magic; returns them as they are otherwise.
fn decompress(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("broken gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// The dimensions of an IDX file of unsigned bytes with `rank` dimensions.
fn idx_dims(path: &Path, bytes: &[u8], rank: u8) -> Result<Vec<usize>> {
    let header = 4 + 4 * rank as usize;
    if bytes.len() >= 4 && (bytes[..3] != [0, 0, 0x08] || bytes[3] != rank) {
        return Err(Error::format(
            path,
            format!("not an IDX file of bytes with {rank} dimensions (magic {:02x?})", &bytes[..4]),
        ));
    }
    if bytes.len() < header {
        return Err(Error::Size {
            path: path.into(),
            expected: header as u64,
            actual: bytes.len() as u64,
        });
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let expected = header + dims.iter().product::<usize>();
    if bytes.len() != expected {
        return Err(Error::Size {
            path: path.into(),
            expected: expected as u64,
            actual: bytes.len() as u64,
        });
    }
    Ok(dims)
}

fn parse(
    name: &str,
    (images_path, images): (&Path, &[u8]),
    (labels_path, labels): (&Path, &[u8]),
) -> Result<InMemory> {
    let image_dims = idx_dims(images_path, images, 3)?;
    let label_dims = idx_dims(labels_path, labels, 1)?;
    if image_dims[1..] != [SIDE, SIDE] {
        return Err(Error::format(
            images_path,
            format!("images of {}x{}, not 28x28", image_dims[1], image_dims[2]),
        ));
    }
    if image_dims[0] != label_dims[0] {
        return Err(Error::format(
            labels_path,
            format!(
                "{} labels for {} images in {}",
                label_dims[0],
                image_dims[0],
                images_path.display()
            ),
        ));
    }
    let labels = labels[8..].to_vec();
    if let Some(index) = labels.iter().position(|&l| l as usize >= CLASSES.len()) {
        return Err(Error::BadLabel {
            path: labels_path.into(),
            index,
            value: labels[index] as i64,
            classes: CLASSES.len(),
        });
    }
    Ok(InMemory::new(name, (SIDE, SIDE, 1), CLASSES.len(), images[16..].to_vec(), labels))
}
