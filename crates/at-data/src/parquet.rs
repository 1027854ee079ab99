//! Reading the Hugging Face Hub's image parquet files: a struct column with the encoded image
//! `bytes` and an integer label column.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::error::{Error, Result};

/// Every row of `path` as (encoded image bytes, label), in file order. `image_col` is a struct
/// with a `bytes` field (as `datasets` writes images); `label_col` an integer.
pub fn read_image_rows(
    path: &Path,
    image_col: &str,
    label_col: &str,
) -> Result<Vec<(Vec<u8>, i64)>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: parquet::errors::ParquetError| {
        Error::format(path, format!("not a readable parquet file: {e}"))
    };
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let rows = reader.get_row_iter(None).map_err(bad)?;
    let mut out = Vec::with_capacity(reader.metadata().file_metadata().num_rows().max(0) as usize);
    for (index, row) in rows.enumerate() {
        let row = row.map_err(bad)?;
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
            (Some(image), Some(label)) => out.push((image, label)),
            _ => {
                let message = format!(
                    "row {index} lacks an image `{image_col}.bytes` or an integer `{label_col}` (is this the dataset's parquet layout?)"
                );
                return Err(Error::format(path, message));
            }
        }
    }
    Ok(out)
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
