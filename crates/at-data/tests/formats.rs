//! Every dataset format, from tiny fixtures written here in the true layout: values come out at
//! the right (channel, row, column), and broken files give errors that name them.

mod common;

use std::path::Path;
use std::sync::Arc;

use at_data::{Dataset, Error, Loader, LoaderConfig, Pipeline, Split, cifar, folder, mnist};
use candle_core::Device;
use common::*;

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A CIFAR-10 directory with two images in every training batch and the test batch.
fn cifar_binary_dir(dir: &Path) {
    for (i, name) in [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]
    .iter()
    .enumerate()
    {
        let mut bytes = cifar_record(i as u8, &pattern(i as u8));
        bytes.extend(cifar_record(9, &pattern(100)));
        write(&dir.join("cifar-10-batches-bin").join(format!("{name}.bin")), &bytes);
    }
}

#[test]
fn cifar_binary_images_come_out_the_right_way_up() {
    let dir = tempfile::tempdir().unwrap();
    cifar_binary_dir(dir.path());
    let train = cifar::load_binary(dir.path(), Split::Train).unwrap();
    assert_eq!((train.len(), train.num_classes()), (10, 10));
    let (image, label) = train.get(2).unwrap(); // the first record of data_batch_2
    assert_eq!(label, 1);
    assert_eq!((image.height, image.width, image.channels), (32, 32, 3));
    assert_eq!(image.data, pattern(1));
    // (row 5, col 30): R = 7 * 5 + 30, G = 255 - 5, B = 3 * 30 + 1.
    assert_eq!([image.at(5, 30, 0), image.at(5, 30, 1), image.at(5, 30, 2)], [65, 250, 91]);
    let test = cifar::load_binary(dir.path(), Split::Test).unwrap();
    assert_eq!(test.labels(), &[5, 9]);
}

#[test]
fn cifar_parquet_gives_the_same_tensors_as_the_binary_batches() {
    let dir = tempfile::tempdir().unwrap();
    cifar_binary_dir(dir.path());
    let parquet = cifar::parquet_path(dir.path(), Split::Test);
    std::fs::create_dir_all(parquet.parent().unwrap()).unwrap();
    write_image_parquet(
        &parquet,
        &[(png(32, 32, &pattern(5)), 5), (png(32, 32, &pattern(100)), 9)],
    );
    let from_parquet = cifar::load_parquet(dir.path(), Split::Test).unwrap();
    let from_binary = cifar::load_binary(dir.path(), Split::Test).unwrap();
    assert_eq!(from_parquet.labels(), from_binary.labels());

    // Through the loader: the tensor value at (item, channel, row, column).
    let batch = |d: at_data::InMemory| {
        let config = LoaderConfig { batch_size: 2, shuffle: false, ..LoaderConfig::default() };
        let loader = Loader::new(Arc::new(d), Pipeline::cifar_test(), config).unwrap();
        loader.epoch(0, &Device::Cpu).next().unwrap().unwrap().images
    };
    let (a, b) = (batch(from_parquet), batch(from_binary));
    let (a, b): (Vec<f32>, Vec<f32>) =
        (a.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
    assert_eq!(a, b);
    // Item 0, channel 2 (blue), row 3, column 10: B = 3 * 10 + 5 = 35.
    let v = a[2 * 32 * 32 + 3 * 32 + 10];
    let expected =
        (35.0 / 255.0 - at_data::transform::CIFAR_MEAN[2]) / at_data::transform::CIFAR_STD[2];
    assert!((v - expected).abs() < 1e-6, "{v} vs {expected}");
}

#[test]
fn cifar_errors_name_the_file_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let err = cifar::load_binary(dir.path(), Split::Train).unwrap_err();
    assert!(matches!(err, Error::Missing { .. }), "{err}");
    assert!(err.to_string().contains("cargo xtask download cifar10"), "{err}");

    let truncated = dir.path().join("data_batch_1.bin");
    let mut bytes = cifar_record(3, &pattern(0));
    bytes.extend(&cifar_record(4, &pattern(0))[..1000]);
    write(&truncated, &bytes);
    let err = cifar::parse_binary(&truncated).unwrap_err().to_string();
    assert!(
        err.contains("data_batch_1.bin") && err.contains("expected 6146 bytes, found 4073"),
        "{err}"
    );

    let bad_label = dir.path().join("test_batch.bin");
    let mut bytes = cifar_record(3, &pattern(0));
    bytes.extend(cifar_record(12, &pattern(0)));
    write(&bad_label, &bytes);
    let err = cifar::parse_binary(&bad_label).unwrap_err().to_string();
    assert!(err.contains("test_batch.bin") && err.contains("label 12 of item 1"), "{err}");

    let garbage = dir.path().join("plain_text/train-00000-of-00001.parquet");
    write(&garbage, b"PAR1 this is not parquet at all");
    let err = cifar::load_parquet(dir.path(), Split::Train).unwrap_err().to_string();
    assert!(err.contains("train-00000-of-00001.parquet") && err.contains("parquet"), "{err}");

    write_image_parquet(&garbage, &[(b"not a png".to_vec(), 1)]);
    let err = cifar::load_parquet(dir.path(), Split::Train).unwrap_err().to_string();
    assert!(err.contains("row0") && err.contains("cannot decode image"), "{err}");

    write_image_parquet(&garbage, &[(png(32, 32, &pattern(0)), 10)]);
    let err = cifar::load_parquet(dir.path(), Split::Train).unwrap_err().to_string();
    assert!(err.contains("label 10 of item 0"), "{err}");
}

fn mnist_files(dir: &Path, gz: bool, labels: &[u8]) {
    let n = labels.len() as u32;
    let images: Vec<u8> = (0..n as usize * 784).map(|i| (i % 251) as u8).collect();
    for (name, bytes) in [
        ("train-images-idx3-ubyte", idx(&[n, 28, 28], &images)),
        ("train-labels-idx1-ubyte", idx(&[n], labels)),
    ] {
        if gz {
            write(&dir.join(format!("{name}.gz")), &gzip(&bytes));
        } else {
            write(&dir.join(name), &bytes);
        }
    }
}

#[test]
fn fashion_mnist_idx_reads_gzipped_and_plain_files_alike() {
    let (plain, gz) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    mnist_files(plain.path(), false, &[3, 1, 4]);
    mnist_files(gz.path(), true, &[3, 1, 4]);
    let a = mnist::load(plain.path(), Split::Train).unwrap();
    let b = mnist::load(gz.path(), Split::Train).unwrap();
    assert_eq!(a.labels(), &[3, 1, 4]);
    assert_eq!(a.labels(), b.labels());
    let (image, _) = b.get(1).unwrap();
    assert_eq!((image.height, image.width, image.channels), (28, 28, 1));
    assert_eq!(image.at(2, 5, 0), ((784 + 2 * 28 + 5) % 251) as u8);
    assert_eq!(a.get(1).unwrap().0, image);
}

#[test]
fn fashion_mnist_parquet_from_the_hub_reads_as_the_idx_files() {
    let (idx_dir, hub_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let labels = [9u8, 0, 3];
    mnist_files(idx_dir.path(), true, &labels);
    let from_idx = mnist::load(idx_dir.path(), Split::Train).unwrap();
    // The same images as PNGs in zalando-datasets/fashion_mnist's layout and schema.
    let rows: Vec<(Vec<u8>, i64)> = (0..labels.len())
        .map(|i| {
            let pixels: Vec<u8> = (i * 784..(i + 1) * 784).map(|p| (p % 251) as u8).collect();
            (png_grey(28, 28, &pixels), labels[i] as i64)
        })
        .collect();
    let path = mnist::parquet_path(hub_dir.path(), Split::Train);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_parquet_with_column(&path, "image", &rows);
    let from_hub = mnist::load(hub_dir.path(), Split::Train).unwrap();
    assert_eq!(from_hub.labels(), from_idx.labels());
    for i in 0..labels.len() {
        assert_eq!(from_hub.get(i).unwrap(), from_idx.get(i).unwrap(), "image {i}");
    }

    write_parquet_with_column(&path, "image", &[(png_grey(28, 28, &[0; 784]), 10)]);
    let err = mnist::load(hub_dir.path(), Split::Train).unwrap_err().to_string();
    assert!(err.contains("label 10 of item 0"), "{err}");
    write_parquet_with_column(&path, "image", &[(png_grey(32, 32, &[0; 1024]), 1)]);
    let err = mnist::load(hub_dir.path(), Split::Train).unwrap_err().to_string();
    assert!(err.contains("row0") && err.contains("not 28x28"), "{err}");
}

#[test]
fn fashion_mnist_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = mnist::load(dir.path(), Split::Test).unwrap_err().to_string();
    assert!(
        err.contains("t10k-images-idx3-ubyte")
            && err.contains("cargo xtask download fashion-mnist")
            && err.contains("dataset-fashion-mnist"),
        "{err}"
    );

    mnist_files(dir.path(), false, &[3, 11]);
    let err = mnist::load(dir.path(), Split::Train).unwrap_err().to_string();
    assert!(err.contains("train-labels-idx1-ubyte") && err.contains("label 11 of item 1"), "{err}");

    let images = dir.path().join("train-images-idx3-ubyte");
    let full = std::fs::read(&images).unwrap();
    write(&images, &full[..full.len() - 10]);
    let err = mnist::load(dir.path(), Split::Train).unwrap_err().to_string();
    assert!(err.contains("expected 1584 bytes, found 1574"), "{err}");

    write(&images, b"\x00\x00\x08\x01garbage");
    let err = mnist::load(dir.path(), Split::Train).unwrap_err().to_string();
    assert!(err.contains("not an IDX file"), "{err}");

    write(&images, &gzip(b"\x00\x00\x08")[..8]);
    let err = mnist::load(dir.path(), Split::Train).unwrap_err().to_string();
    assert!(err.contains("gzip"), "{err}");
}

#[test]
fn embedded_subset_is_stratified_and_loads_with_no_file() {
    let train = mnist::embedded(Split::Train).unwrap();
    let test = mnist::embedded(Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (10_000, 2_000));
    for (split, per_class) in [(&train, 1000), (&test, 200)] {
        let mut counts = [0; 10];
        for &l in split.labels() {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [per_class; 10]);
    }
    // The normalisation constants fit the real data: mean and std of the subset's pixels.
    let (mut sum, mut sum_sq, mut n) = (0f64, 0f64, 0f64);
    for i in 0..train.len() {
        for &p in &train.get(i).unwrap().0.data {
            let x = p as f64 / 255.0;
            sum += x;
            sum_sq += x * x;
            n += 1.0;
        }
    }
    let mean = sum / n;
    let std = (sum_sq / n - mean * mean).sqrt();
    assert!((mean - at_data::transform::FASHION_MNIST_MEAN[0] as f64).abs() < 0.01, "mean {mean}");
    assert!((std - at_data::transform::FASHION_MNIST_STD[0] as f64).abs() < 0.01, "std {std}");
}

#[test]
fn cub_images_are_cropped_to_their_box_and_split_as_listed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("CUB_200_2011");
    let files = [
        ("001.Black_footed_Albatross/a.jpg", 1, 1),
        ("002.Laysan_Albatross/b.png", 2, 0),
        ("200.Common_Yellowthroat/c.jpg", 200, 1),
    ];
    let (mut images, mut labels, mut split, mut boxes) =
        (String::new(), String::new(), String::new(), String::new());
    for (i, (path, class, train)) in files.iter().enumerate() {
        let id = i + 1;
        write_image(&root.join("images").join(path), 40, 60, |y, x| {
            [(x * 4) as u8, (y * 6) as u8, 0]
        });
        images += &format!("{id} {path}\n");
        labels += &format!("{id} {class}\n");
        split += &format!("{id} {train}\n");
        boxes += &format!("{id} 10.0 5.0 30.0 20.0\n");
    }
    for (name, text) in [
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("bounding_boxes.txt", boxes),
    ] {
        write(&root.join(name), text.as_bytes());
    }
    let train = folder::cub(dir.path(), Split::Train).unwrap();
    let test = folder::cub(dir.path(), Split::Test).unwrap();
    assert_eq!((train.len(), test.len(), train.num_classes()), (2, 1, 200));
    let (image, label) = train.get(1).unwrap();
    assert_eq!(label, 199);
    assert_eq!((image.height, image.width), (20, 30), "cropped to the box");
    let (png_image, _) = test.get(0).unwrap(); // lossless: the crop starts at x = 10, y = 5
    assert_eq!([png_image.at(0, 0, 0), png_image.at(0, 0, 1)], [40, 30]);

    write(&root.join("image_class_labels.txt"), b"1 1\n2 201\n3 200\n");
    let err = folder::cub(dir.path(), Split::Test).unwrap_err().to_string();
    assert!(err.contains("image_class_labels.txt") && err.contains("label 201"), "{err}");
    write(&root.join("bounding_boxes.txt"), b"1 10.0 5.0\n");
    let err = folder::cub(dir.path(), Split::Test).unwrap_err().to_string();
    assert!(err.contains("bounding_boxes.txt") && err.contains("line 1"), "{err}");
    let err = folder::cub(&dir.path().join("elsewhere"), Split::Test).unwrap_err().to_string();
    assert!(err.contains("cargo xtask download cub"), "{err}");
}

#[test]
fn scenes_follow_the_official_split_files() {
    let dir = tempfile::tempdir().unwrap();
    for (class, file) in [
        ("kitchen", "k1.jpg"),
        ("kitchen", "k2.jpg"),
        ("airport_inside", "a1.jpg"),
        ("bar", "b1.jpg"),
    ] {
        write_image(&dir.path().join("Images").join(class).join(file), 30, 20, |_, _| [10, 20, 30]);
    }
    write(&dir.path().join("TrainImages.txt"), b"kitchen/k1.jpg\nairport_inside/a1.jpg\n");
    write(&dir.path().join("TestImages.txt"), b"kitchen/k2.jpg\nbar/b1.jpg\n");
    let train = folder::scenes(dir.path(), Split::Train).unwrap();
    let test = folder::scenes(dir.path(), Split::Test).unwrap();
    assert_eq!(train.classes(), ["airport_inside", "bar", "kitchen"]);
    let labels: Vec<usize> = (0..test.len()).map(|i| test.get(i).unwrap().1).collect();
    assert_eq!(labels, [2, 1]);
    assert_eq!(train.get(1).unwrap().0.height, 30);

    write(&dir.path().join("TestImages.txt"), b"kitchen/missing.jpg\n");
    let err = folder::scenes(dir.path(), Split::Test).unwrap().get(0).unwrap_err().to_string();
    assert!(err.contains("missing.jpg"), "{err}");
}

#[test]
fn imagenet_folders_share_one_class_numbering() {
    let dir = tempfile::tempdir().unwrap();
    for (split, wnid, file) in [
        ("train", "n02", "x.JPEG"),
        ("train", "n01", "y.JPEG"),
        ("train", "n01", "z.JPEG"),
        ("val", "n01", "v.JPEG"),
        ("val", "n02", "w.JPEG"),
    ] {
        let path = dir.path().join(split).join(wnid).join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let img = image::RgbImage::from_fn(8, 6, |_, _| image::Rgb([1, 2, 3]));
        img.save_with_format(&path, image::ImageFormat::Jpeg).unwrap();
    }
    let train = folder::imagenet(dir.path(), Split::Train).unwrap();
    let val = folder::imagenet(dir.path(), Split::Test).unwrap();
    assert_eq!(train.classes(), ["n01", "n02"]);
    assert_eq!((0..3).map(|i| train.get(i).unwrap().1).collect::<Vec<_>>(), [0, 0, 1]);
    assert_eq!((0..2).map(|i| val.get(i).unwrap().1).collect::<Vec<_>>(), [0, 1]);
    let err = folder::imagenet(&dir.path().join("none"), Split::Train).unwrap_err().to_string();
    assert!(err.contains("gated") && err.contains("HF_TOKEN"), "{err}");
}

#[test]
fn imagenet_parquet_shards_are_read_on_demand_in_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let item = |k: u8| -> Vec<u8> { (0..6 * 8).flat_map(|_| [k, 2 * k, 3 * k]).collect() };
    let shards = [("train-00000-of-00002.parquet", 0u8..2), ("train-00001-of-00002.parquet", 2..5)];
    for (name, range) in shards {
        let rows: Vec<(Vec<u8>, i64)> =
            range.map(|k| (png(6, 8, &item(k)), 10 * k as i64)).collect();
        write_parquet_with_column(&dir.path().join("data").join(name), "image", &rows);
    }
    let validation = dir.path().join("data/validation-00000-of-00001.parquet");
    write_parquet_with_column(&validation, "image", &[(png(6, 8, &item(9)), 1000)]);
    let train = folder::imagenet_parquet(dir.path(), Split::Train).unwrap();
    assert_eq!((train.len(), train.num_classes()), (5, 1000));
    for k in [4u8, 0, 3, 1, 2] {
        let (image, label) = train.get(k as usize).unwrap();
        assert_eq!((label, image.data.clone()), (10 * k as usize, item(k)), "item {k}");
    }
    let val = folder::imagenet_parquet(dir.path(), Split::Test).unwrap();
    let err = val.get(0).unwrap_err().to_string();
    assert!(
        err.contains("validation-00000-of-00001.parquet") && err.contains("label 1000"),
        "{err}"
    );
    let err =
        folder::imagenet_parquet(&dir.path().join("none"), Split::Train).err().unwrap().to_string();
    assert!(err.contains("train-*.parquet") && err.contains("HF_TOKEN"), "{err}");
}

#[test]
fn garbage_and_truncated_files_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    let good_png = png(32, 32, &pattern(3));
    for len in [0, 1, 3, 4, 15, 16, 17, 100, 3073, 6146, 9000] {
        let bytes = noise(len);
        let path = dir.path().join("data_batch_1.bin");
        write(&path, &bytes);
        let _ = cifar::parse_binary(&path); // Ok for a lucky record, an error otherwise; no panic.

        let mnist_dir = dir.path().join(format!("mnist{len}"));
        write(&mnist_dir.join("train-images-idx3-ubyte"), &bytes);
        write(&mnist_dir.join("train-labels-idx1-ubyte"), &bytes);
        assert!(mnist::load(&mnist_dir, Split::Train).is_err());

        let parquet = dir.path().join(format!("p{len}/plain_text/train-00000-of-00001.parquet"));
        write(&parquet, &bytes);
        assert!(cifar::load_parquet(&dir.path().join(format!("p{len}")), Split::Train).is_err());

        assert!(at_data::Image::decode(&bytes, Path::new("noise"), false).is_err());
        let cut = &good_png[..len.min(good_png.len() / 2)];
        assert!(
            at_data::Image::decode(cut, Path::new("cut.png"), false).is_err(),
            "truncated PNG of {len}"
        );
    }
    let jpeg = dir.path().join("Images/kitchen/cut.jpg");
    write_image(&jpeg, 40, 40, |y, x| [x as u8, y as u8, 0]);
    let full = std::fs::read(&jpeg).unwrap();
    write(&jpeg, &full[..full.len() / 3]);
    write(&dir.path().join("TrainImages.txt"), b"kitchen/cut.jpg\n");
    write(&dir.path().join("TestImages.txt"), b"");
    let err = folder::scenes(dir.path(), Split::Train).unwrap().get(0).unwrap_err().to_string();
    assert!(err.contains("cut.jpg") && err.contains("cannot decode"), "{err}");
}
