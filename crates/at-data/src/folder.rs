//! Datasets of image files listed on disk, decoded when an item is read: CUB-200-2011 (each
//! image cropped to its bird's bounding box), MIT Indoor 67 (the official split) and ImageNet
//! (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`). JPEG and PNG are decoded by the `image` crate.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::cifar::Split;
use crate::dataset::Dataset;
use crate::error::{Error, Result, read};
use crate::image::Image;
use crate::parquet::ParquetImages;

/// A bounding box in pixels: top-left corner, width and height.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BBox {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

/// Image files with labels (and optionally a box to crop to).
#[derive(Clone, Debug)]
pub struct ImageFiles {
    name: String,
    classes: Vec<String>,
    items: Vec<(PathBuf, usize, Option<BBox>)>,
}

impl ImageFiles {
    /// The class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The file, label and box of every item.
    pub fn items(&self) -> &[(PathBuf, usize, Option<BBox>)] {
        &self.items
    }
}

impl Dataset for ImageFiles {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn get(&self, index: usize) -> Result<(Image, usize)> {
        let (path, label, bbox) = &self.items[index];
        let image = Image::open(path)?;
        let image = match bbox {
            Some(b) => crop_to_box(&image, b),
            None => image,
        };
        Ok((image, *label))
    }
}

/// The part of `image` inside `b`, rounded outwards to whole pixels and clipped to the image.
pub fn crop_to_box(image: &Image, b: &BBox) -> Image {
    let left = (b.x.floor().max(0.0) as usize).min(image.width - 1);
    let top = (b.y.floor().max(0.0) as usize).min(image.height - 1);
    let right = ((b.x + b.width).ceil() as usize).clamp(left + 1, image.width);
    let bottom = ((b.y + b.height).ceil() as usize).clamp(top + 1, image.height);
    image.crop(top, left, bottom - top, right - left)
}

/// The lines of a small text file, each with its 1-based number, blank lines skipped.
fn lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let text = String::from_utf8(read(path)?).map_err(|_| Error::format(path, "not UTF-8 text"))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.trim().to_owned()))
        .collect())
}

/// `<id> <rest...>` lines as a map from id to the remaining fields.
fn id_table(path: &Path, fields: usize) -> Result<HashMap<u64, Vec<String>>> {
    let mut table = HashMap::new();
    for (number, line) in lines(path)? {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let id = parts.first().and_then(|p| p.parse::<u64>().ok());
        match id {
            Some(id) if parts.len() == fields + 1 => {
                table.insert(id, parts[1..].iter().map(|s| s.to_string()).collect());
            }
            _ => {
                let message =
                    format!("line {number} is not `<id>` and {fields} field(s): {line:?}");
                return Err(Error::format(path, message));
            }
        }
    }
    Ok(table)
}

fn missing(what: &str, path: PathBuf, download: &str) -> Error {
    Error::Missing {
        what: what.into(),
        path,
        hint: format!("run `cargo xtask download {download}`"),
    }
}

/// The directory holding `marker`: `root` itself or `root/nested`.
fn locate(root: &Path, nested: &str, marker: &str) -> Option<PathBuf> {
    [root.to_path_buf(), root.join(nested)].into_iter().find(|dir| dir.join(marker).exists())
}

/// CUB-200-2011 in its original layout under `root` (or `root/CUB_200_2011`): 5994 training and
/// 5794 test images of 200 species, each cropped to its bounding box.
pub fn cub(root: &Path, split: Split) -> Result<ImageFiles> {
    let dir = locate(root, "CUB_200_2011", "images.txt")
        .ok_or_else(|| missing("CUB-200-2011 (images.txt)", root.to_path_buf(), "cub"))?;
    let images = id_table(&dir.join("images.txt"), 1)?;
    let labels = id_table(&dir.join("image_class_labels.txt"), 1)?;
    let split_file = dir.join("train_test_split.txt");
    let is_train = id_table(&split_file, 1)?;
    let boxes_file = dir.join("bounding_boxes.txt");
    let boxes = id_table(&boxes_file, 4)?;

    let mut ids: Vec<u64> = images.keys().copied().collect();
    ids.sort_unstable();
    let want = if split == Split::Train { "1" } else { "0" };
    let labels_file = dir.join("image_class_labels.txt");
    let mut items = Vec::new();
    for (index, id) in ids.into_iter().enumerate() {
        let field = |table: &HashMap<u64, Vec<String>>, file: &Path| -> Result<Vec<String>> {
            table
                .get(&id)
                .cloned()
                .ok_or_else(|| Error::format(file, format!("no entry for image id {id}")))
        };
        if field(&is_train, &split_file)?[0] != want {
            continue;
        }
        let class: i64 = field(&labels, &labels_file)?[0].parse().map_err(|_| {
            Error::format(&labels_file, format!("image id {id}: the class is not a number"))
        })?;
        if !(1..=200).contains(&class) {
            return Err(Error::BadLabel {
                path: labels_file.clone(),
                index,
                value: class,
                classes: 200,
            });
        }
        let b: Vec<f64> = field(&boxes, &boxes_file)?
            .iter()
            .map(|v| v.parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                Error::format(&boxes_file, format!("image id {id}: a box value is not a number"))
            })?;
        let bbox = BBox { x: b[0], y: b[1], width: b[2], height: b[3] };
        let path = dir.join("images").join(&images[&id][0]);
        items.push((path, (class - 1) as usize, Some(bbox)));
    }
    let classes = (1..=200).map(|c| format!("{c:03}")).collect();
    Ok(ImageFiles { name: format!("cub/{}", split.as_str()), classes, items })
}

/// MIT Indoor 67 under `root`: `Images/<class>/<file>.jpg` with the official split in
/// `TrainImages.txt` / `TestImages.txt` (80 and 20 images per class). Classes are numbered in
/// alphabetical order of the classes both files name.
pub fn scenes(root: &Path, split: Split) -> Result<ImageFiles> {
    let dir = locate(root, "indoorCVPR_09", "TrainImages.txt")
        .ok_or_else(|| missing("MIT Indoor 67 (TrainImages.txt)", root.to_path_buf(), "scenes"))?;
    let train = lines(&dir.join("TrainImages.txt"))?;
    let test_file = dir.join("TestImages.txt");
    let test = lines(&test_file)?;
    let class_of = |path: &Path, number: usize, line: &str| -> Result<String> {
        match line.split_once('/') {
            Some((class, file)) if !class.is_empty() && !file.is_empty() => Ok(class.to_owned()),
            _ => {
                Err(Error::format(path, format!("line {number} is not `<class>/<file>`: {line:?}")))
            }
        }
    };
    let mut classes = BTreeSet::new();
    for (file, list) in [(dir.join("TrainImages.txt"), &train), (test_file.clone(), &test)] {
        for (number, line) in list.iter() {
            classes.insert(class_of(&file, *number, line)?);
        }
    }
    let classes: Vec<String> = classes.into_iter().collect();
    let list = if split == Split::Train { &train } else { &test };
    let images = if dir.join("Images").is_dir() { dir.join("Images") } else { dir.clone() };
    let items = list
        .iter()
        .map(|(number, line)| {
            let class = class_of(&dir, *number, line)?;
            let label = classes.binary_search(&class).expect("every class was collected");
            Ok((images.join(line), label, None))
        })
        .collect::<Result<_>>()?;
    Ok(ImageFiles { name: format!("scenes/{}", split.as_str()), classes, items })
}

/// ImageNet in folders: `root/train/<wnid>/*` and `root/val/<wnid>/*`. Classes are the sorted
/// wnids of `train`, so both splits share one numbering.
pub fn imagenet(root: &Path, split: Split) -> Result<ImageFiles> {
    let train = root.join("train");
    if !train.is_dir() {
        return Err(Error::Missing {
            what: "ImageNet folders (train/<wnid>/*.JPEG)".into(),
            path: train,
            hint: "ImageNet is gated: accept its terms on https://huggingface.co/datasets/ILSVRC/imagenet-1k, \
                   set HF_TOKEN, and unpack it into train/ and val/ folders of wnids"
                .into(),
        });
    }
    let classes = sorted_entries(&train, true)?;
    let dir = root.join(if split == Split::Train { "train" } else { "val" });
    let mut items = Vec::new();
    for (label, wnid) in classes.iter().enumerate() {
        let class_dir = dir.join(wnid);
        if !class_dir.is_dir() {
            if split == Split::Train {
                continue;
            }
            return Err(Error::Missing {
                what: format!("ImageNet validation class {wnid}"),
                path: class_dir,
                hint: "sort the validation images into val/<wnid>/ folders".into(),
            });
        }
        for file in sorted_entries(&class_dir, false)? {
            items.push((class_dir.join(file), label, None));
        }
    }
    Ok(ImageFiles { name: format!("imagenet/{}", split.as_str()), classes, items })
}

/// The names of the sub-directories (or files) of `dir`, sorted.
fn sorted_entries(dir: &Path, dirs: bool) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let is_dir = entry.file_type().map_err(|e| Error::io(entry.path(), e))?.is_dir();
        if is_dir == dirs {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// ImageNet in the Hub's parquet layout (`ILSVRC/imagenet-1k`): `root/data/train-*.parquet` and
/// `root/data/validation-*.parquet`, columns `image` (struct with JPEG `bytes`) and `label`.
/// Items are decoded from their row groups on demand; see [`ParquetImages`].
pub fn imagenet_parquet(root: &Path, split: Split) -> Result<ParquetImages> {
    let prefix = if split == Split::Train { "train-" } else { "validation-" };
    let dir = root.join("data");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name =
                    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                name.starts_with(prefix) && name.ends_with(".parquet")
            })
            .collect(),
        Err(_) => vec![],
    };
    files.sort();
    if files.is_empty() {
        return Err(Error::Missing {
            what: format!("ImageNet parquet shards ({prefix}*.parquet)"),
            path: dir,
            hint: "ImageNet is gated: accept its terms on https://huggingface.co/datasets/ILSVRC/imagenet-1k, \
                   set HF_TOKEN, and run `cargo xtask download imagenet --files ...`"
                .into(),
        });
    }
    ParquetImages::open(&format!("imagenet/{}", split.as_str()), &files, "image", "label", 1000)
}
