//! Writers of tiny fixtures in each dataset's true format.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

/// A 32x32 RGB image whose every pixel tells where it is: R = 7 * row + col, G = 255 - row,
/// B = 3 * col + k. Interleaved (row, col, channel).
pub fn pattern(k: u8) -> Vec<u8> {
    let mut data = Vec::with_capacity(32 * 32 * 3);
    for row in 0..32u8 {
        for col in 0..32u8 {
            data.extend_from_slice(&[7 * row + col, 255 - row, 3 * col + k]);
        }
    }
    data
}

/// A CIFAR binary record: label, then the R, G, B planes.
pub fn cifar_record(label: u8, interleaved: &[u8]) -> Vec<u8> {
    let mut record = vec![label];
    for ch in 0..3 {
        record.extend(interleaved.iter().skip(ch).step_by(3));
    }
    record
}

/// PNG bytes of an interleaved RGB image.
pub fn png(height: u32, width: u32, interleaved: &[u8]) -> Vec<u8> {
    let img = image::RgbImage::from_raw(width, height, interleaved.to_vec()).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// PNG bytes of a grey image.
pub fn png_grey(height: u32, width: u32, pixels: &[u8]) -> Vec<u8> {
    let img = image::GrayImage::from_raw(width, height, pixels.to_vec()).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Writes a parquet file with the Hub's image-dataset schema: `img` a struct of `bytes` and
/// `path`, `label` an int64, all optional as `datasets` writes them, snappy-compressed.
pub fn write_image_parquet(path: &Path, rows: &[(Vec<u8>, i64)]) {
    write_parquet_with_column(path, "img", rows)
}

/// As [`write_image_parquet`] with another name for the image column (ImageNet's is `image`).
pub fn write_parquet_with_column(path: &Path, image_col: &str, rows: &[(Vec<u8>, i64)]) {
    let schema = parse_message_type(&format!(
        "message schema {{
            optional group {image_col} {{ optional binary bytes; optional binary path (STRING); }}
            optional int64 label;
        }}"
    ))
    .unwrap();
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let n = rows.len();
    // img.bytes: present (definition level 2).
    let mut col = group.next_column().unwrap().unwrap();
    let bytes: Vec<ByteArray> = rows.iter().map(|(b, _)| ByteArray::from(b.clone())).collect();
    col.typed::<ByteArrayType>().write_batch(&bytes, Some(&vec![2; n]), None).unwrap();
    col.close().unwrap();
    // img.path: null inside a present struct (definition level 1).
    let mut col = group.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>().write_batch(&[], Some(&vec![1; n]), None).unwrap();
    col.close().unwrap();
    // label: present.
    let mut col = group.next_column().unwrap().unwrap();
    let labels: Vec<i64> = rows.iter().map(|(_, l)| *l).collect();
    col.typed::<Int64Type>().write_batch(&labels, Some(&vec![1; n]), None).unwrap();
    col.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
}

/// An IDX file of unsigned bytes.
pub fn idx(dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes an RGB image file (the format follows the extension).
pub fn write_image(path: &Path, height: u32, width: u32, fill: impl Fn(u32, u32) -> [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb(fill(y, x)));
    img.save(path).unwrap();
}
