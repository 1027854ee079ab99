//! Reading the Hugging Face Hub's image parquet files: a struct column with the encoded image
//! `bytes` and an integer label column. Small files are read whole ([`read_image_rows`]); large
//! sharded ones (ImageNet) are read a row group at a time as items are asked for
//! ([`ParquetImages`]).

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::image::Image;

type Rows = Vec<(Vec<u8>, i64)>;

fn open(path: &Path) -> Result<SerializedFileReader<File>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    SerializedFileReader::new(file).map_err(|e| bad(path, e))
}

fn bad(path: &Path, e: parquet::errors::ParquetError) -> Error {
    Error::format(path, format!("not a readable parquet file: {e}"))
}

/// The (image bytes, label) of a row, or an error naming the row.
fn parse_row(
    path: &Path,
    index: usize,
    row: &Row,
    image_col: &str,
    label_col: &str,
) -> Result<(Vec<u8>, i64)> {
    let (mut image, mut label) = (None, None);
    for (name, field) in row.get_column_iter() {
        if name == image_col {
            image = image_bytes(field);
        } else if name == label_col {
            label = match field {
                Field::Long(v) => Some(*v),
                Field::Int(v) => Some(*v as i64),
                Field::Short(v) => Some(*v as i64),
                Field::Byte(v) => Some(*v as i64),
                _ => None,
            };
        }
    }
    match (image, label) {
        (Some(image), Some(label)) => Ok((image, label)),
        _ => Err(Error::format(
            path,
            format!(
                "row {index} lacks an image `{image_col}.bytes` or an integer `{label_col}` (is this the dataset's parquet layout?)"
            ),
        )),
    }
}

/// Every row of `path` as (encoded image bytes, label), in file order. `image_col` is a struct
/// with a `bytes` field (as `datasets` writes images); `label_col` an integer.
pub fn read_image_rows(path: &Path, image_col: &str, label_col: &str) -> Result<Rows> {
    let reader = open(path)?;
    let mut out = Vec::with_capacity(reader.metadata().file_metadata().num_rows().max(0) as usize);
    for (index, row) in reader.get_row_iter(None).map_err(|e| bad(path, e))?.enumerate() {
        out.push(parse_row(path, index, &row.map_err(|e| bad(path, e))?, image_col, label_col)?);
    }
    Ok(out)
}

/// Decodes every row of `path` (columns `(image, label)`) into `side`x`side` images, grey or
/// RGB, checking each label against `classes`: the pixels one image after another, and the
/// labels.
pub fn decode_images(
    path: &Path,
    (image_col, label_col): (&str, &str),
    (side, grey): (usize, bool),
    classes: usize,
) -> Result<(Vec<u8>, Vec<u8>)> {
    use rayon::prelude::*;
    let rows = read_image_rows(path, image_col, label_col)?;
    let decoded: Vec<Result<(Image, u8)>> = rows
        .par_iter()
        .enumerate()
        .map(|(index, (bytes, label))| {
            if !(0..classes as i64).contains(label) {
                return Err(Error::BadLabel { path: path.into(), index, value: *label, classes });
            }
            let origin = path.join(format!("row{index}"));
            let image = Image::decode(bytes, &origin, grey)?;
            if (image.height, image.width) != (side, side) {
                return Err(Error::format(
                    &origin,
                    format!("a {}x{} image, not {side}x{side}", image.height, image.width),
                ));
            }
            Ok((image, *label as u8))
        })
        .collect();
    let channels = if grey { 1 } else { 3 };
    let mut pixels = Vec::with_capacity(rows.len() * side * side * channels);
    let mut labels = Vec::with_capacity(rows.len());
    for item in decoded {
        let (image, label) = item?;
        pixels.extend_from_slice(&image.data);
        labels.push(label);
    }
    Ok((pixels, labels))
}

/// One row group of one file: where its rows sit in the dataset.
#[derive(Clone, Debug)]
struct Group {
    file: PathBuf,
    index: usize,
    start: usize,
    rows: usize,
}

/// Images in sharded parquet files, decoded on demand: only the metadata is read up front, and
/// the row groups holding the items asked for are read and kept in a small cache (reading a
/// group costs about as much as its size, so shuffled access over a large dataset is slow;
/// unpack to folders for long training runs).
pub struct ParquetImages {
    name: String,
    classes: usize,
    image_col: String,
    label_col: String,
    groups: Vec<Group>,
    cache: Mutex<VecDeque<(usize, Arc<Rows>)>>,
    capacity: usize,
}

impl ParquetImages {
    /// Indexes `files` (in order) whose rows have an image struct `image_col` and an integer
    /// `label_col` in `0..classes`.
    pub fn open(
        name: &str,
        files: &[PathBuf],
        image_col: &str,
        label_col: &str,
        classes: usize,
    ) -> Result<Self> {
        let mut groups = Vec::new();
        let mut start = 0;
        for file in files {
            let reader = open(file)?;
            for (index, meta) in reader.metadata().row_groups().iter().enumerate() {
                let rows = meta.num_rows().max(0) as usize;
                groups.push(Group { file: file.clone(), index, start, rows });
                start += rows;
            }
        }
        let capacity = 2 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Ok(Self {
            name: name.into(),
            classes,
            image_col: image_col.into(),
            label_col: label_col.into(),
            groups,
            cache: Mutex::new(VecDeque::new()),
            capacity,
        })
    }

    fn rows(&self, g: usize) -> Result<Arc<Rows>> {
        if let Some((_, rows)) =
            self.cache.lock().expect("cache lock").iter().find(|(i, _)| *i == g)
        {
            return Ok(rows.clone());
        }
        let group = &self.groups[g];
        let reader = open(&group.file)?;
        let group_reader = reader.get_row_group(group.index).map_err(|e| bad(&group.file, e))?;
        let mut rows = Vec::with_capacity(group.rows);
        for (i, row) in
            group_reader.get_row_iter(None).map_err(|e| bad(&group.file, e))?.enumerate()
        {
            let row = row.map_err(|e| bad(&group.file, e))?;
            rows.push(parse_row(
                &group.file,
                group.start + i,
                &row,
                &self.image_col,
                &self.label_col,
            )?);
        }
        let rows = Arc::new(rows);
        let mut cache = self.cache.lock().expect("cache lock");
        cache.push_back((g, rows.clone()));
        if cache.len() > self.capacity {
            cache.pop_front();
        }
        Ok(rows)
    }
}

impl Dataset for ParquetImages {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> usize {
        self.groups.last().map_or(0, |g| g.start + g.rows)
    }

    fn num_classes(&self) -> usize {
        self.classes
    }

    fn get(&self, index: usize) -> Result<(Image, usize)> {
        let g = self.groups.partition_point(|group| group.start <= index) - 1;
        let group = &self.groups[g];
        let rows = self.rows(g)?;
        let (bytes, label) = rows.get(index - group.start).ok_or_else(|| {
            Error::format(
                &group.file,
                format!("row group {} has fewer rows than its metadata says", group.index),
            )
        })?;
        if !(0..self.classes as i64).contains(label) {
            return Err(Error::BadLabel {
                path: group.file.clone(),
                index,
                value: *label,
                classes: self.classes,
            });
        }
        let origin = group.file.join(format!("row{}", index - group.start));
        Ok((Image::decode(bytes, &origin, false)?, *label as usize))
    }
}

fn image_bytes(field: &Field) -> Option<Vec<u8>> {
    match field {
        Field::Group(group) => group.get_column_iter().find_map(|(name, f)| match f {
            Field::Bytes(b) if name == "bytes" => Some(b.data().to_vec()),
            _ => None,
        }),
        Field::Bytes(b) => Some(b.data().to_vec()),
        _ => None,
    }
}
