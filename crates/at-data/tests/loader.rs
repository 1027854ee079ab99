//! The loader and the augmentations: determinism whatever the threads, epochs, resuming, and the
//! geometric properties of each transform.

use std::sync::Arc;

use at_data::transform::{
    self, CIFAR_MEAN, CIFAR_STD, hflip, random_resized_crop_box, reflect_pad,
};
use at_data::{Augment, Dataset, Image, InMemory, Loader, LoaderConfig, Pipeline, Split, mnist};
use candle_core::{DType, Device};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// 37 CIFAR-sized images whose pixels all differ, with labels `i % 10`.
fn tiny_dataset() -> Arc<InMemory> {
    let n = 37;
    let pixels: Vec<u8> = (0..n * 32 * 32 * 3).map(|i| ((i * 31 + i / 3072) % 256) as u8).collect();
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Arc::new(InMemory::new("tiny", (32, 32, 3), 10, pixels, labels))
}

fn all_batches(loader: &Loader, epoch: u64) -> Vec<(Vec<f32>, Vec<u32>, Vec<usize>)> {
    loader
        .epoch(epoch, &Device::Cpu)
        .map(|b| {
            let b = b.unwrap();
            (
                b.images.flatten_all().unwrap().to_vec1().unwrap(),
                b.labels.to_vec1().unwrap(),
                b.indices,
            )
        })
        .collect()
}

fn loader(threads: usize, seed: u64, drop_last: bool) -> Loader {
    let config =
        LoaderConfig { batch_size: 8, shuffle: true, drop_last, seed, threads, prefetch: 2 };
    Loader::new(tiny_dataset(), Pipeline::cifar_train(), config).unwrap()
}

#[test]
fn the_same_seed_gives_the_same_batches_whatever_the_number_of_threads() {
    let one = all_batches(&loader(1, 42, false), 3);
    assert_eq!(one, all_batches(&loader(2, 42, false), 3));
    assert_eq!(one, all_batches(&loader(5, 42, false), 3));
    assert_ne!(one, all_batches(&loader(2, 43, false), 3), "another seed, other batches");
    assert_ne!(one, all_batches(&loader(2, 42, false), 4), "another epoch, other batches");
}

#[test]
fn an_epoch_serves_every_item_once_and_drop_last_drops_the_remainder() {
    let batches = all_batches(&loader(2, 1, false), 0);
    assert_eq!(batches.len(), 5);
    let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.2.clone()).collect();
    seen.sort();
    assert_eq!(seen, (0..37).collect::<Vec<_>>());
    assert_eq!(batches[4].1.len(), 5);
    for (_, labels, indices) in &batches {
        let expected: Vec<u32> = indices.iter().map(|i| (i % 10) as u32).collect();
        assert_eq!(labels, &expected);
    }
    let dropped = loader(2, 1, true);
    assert_eq!(dropped.batches_per_epoch(), 4);
    assert!(all_batches(&dropped, 0).iter().all(|b| b.1.len() == 8));
}

#[test]
fn resuming_mid_epoch_gives_the_rest_of_the_same_epoch() {
    let l = loader(2, 9, false);
    let full = all_batches(&l, 2);
    let rest: Vec<_> = l.epoch_from(2, 3, &Device::Cpu).map(|b| b.unwrap().indices).collect();
    assert_eq!(rest, full[3..].iter().map(|b| b.2.clone()).collect::<Vec<_>>());
}

#[test]
fn batches_have_the_network_layout_and_dtype() {
    let config = LoaderConfig { batch_size: 16, threads: 2, ..LoaderConfig::default() };
    let l = Loader::new(
        Arc::new(mnist::embedded(Split::Test).unwrap()),
        Pipeline::fashion_mnist_test(),
        config,
    )
    .unwrap();
    let batch = l.epoch(0, &Device::Cpu).next().unwrap().unwrap();
    assert_eq!(batch.images.dims(), &[16, 1, 32, 32]);
    assert_eq!((batch.images.dtype(), batch.labels.dtype()), (DType::F32, DType::U32));
    // Zero padding 28 -> 32 puts background (0 -> -mean/std) in the two outer rows.
    let first_row: Vec<f32> =
        batch.images.get(0).unwrap().get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
    let background = -transform::FASHION_MNIST_MEAN[0] / transform::FASHION_MNIST_STD[0];
    assert!(first_row.iter().all(|v| (v - background).abs() < 1e-6));
}

/// At side 28 the images are used as they are: batches of 28x28 for training (padded by 4,
/// cropped back to 28) and evaluation, the evaluation images equal to the stored pixels
/// normalised.
#[test]
fn fashion_mnist_at_its_own_side_is_not_padded() {
    let config =
        LoaderConfig { batch_size: 8, threads: 1, shuffle: false, ..LoaderConfig::default() };
    let data = Arc::new(mnist::embedded(Split::Test).unwrap());
    for pipeline in [Pipeline::fashion_mnist_train_at(28), Pipeline::fashion_mnist_test_at(28)] {
        let l = Loader::new(data.clone(), pipeline, config.clone()).unwrap();
        let batch = l.epoch(0, &Device::Cpu).next().unwrap().unwrap();
        assert_eq!(batch.images.dims(), &[8, 1, 28, 28]);
    }
    let l = Loader::new(data.clone(), Pipeline::fashion_mnist_test_at(28), config).unwrap();
    let batch = l.epoch(0, &Device::Cpu).next().unwrap().unwrap();
    let got: Vec<f32> = batch.images.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let (image, _) = data.get(0).unwrap();
    let (mean, std) = (transform::FASHION_MNIST_MEAN[0], transform::FASHION_MNIST_STD[0]);
    let want: Vec<f32> = image.data.iter().map(|&v| (v as f32 / 255.0 - mean) / std).collect();
    assert_eq!(got.len(), want.len());
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "pixels moved or scaled");
}

#[test]
fn a_batch_of_unequal_images_is_an_error_that_reaches_the_consumer() {
    let pipeline = Pipeline { augment: Augment::None, ..Pipeline::imagenet_eval() };
    // Images of different sizes in one batch, without a crop to equalise them.
    struct Mixed;
    impl Dataset for Mixed {
        fn name(&self) -> &str {
            "mixed"
        }
        fn len(&self) -> usize {
            2
        }
        fn num_classes(&self) -> usize {
            1
        }
        fn get(&self, index: usize) -> at_data::Result<(Image, usize)> {
            let side = 4 + index;
            Ok((Image::new(side, side, 3, vec![0; side * side * 3]), 0))
        }
    }
    let config =
        LoaderConfig { batch_size: 2, shuffle: false, threads: 1, ..LoaderConfig::default() };
    let l = Loader::new(Arc::new(Mixed), pipeline, config).unwrap();
    let err = l.epoch(0, &Device::Cpu).next().unwrap().unwrap_err().to_string();
    assert!(err.contains("mixed") && err.contains("add a crop or resize"), "{err}");
}

fn numbered(h: usize, w: usize) -> Image {
    Image::new(h, w, 1, (0..h * w).map(|i| (i % 256) as u8).collect())
}

#[test]
fn cifar_crop_is_a_window_of_the_reflect_padded_image_possibly_flipped() {
    let image = Image::new(32, 32, 3, (0..32 * 32 * 3).map(|i| (i % 253) as u8).collect());
    let padded = reflect_pad(&image, 4);
    assert_eq!((padded.height, padded.width), (40, 40));
    // Reflection: padded column 0 mirrors column 4 of the image (the edge is not repeated).
    assert_eq!(padded.at(10, 0, 1), image.at(6, 4, 1));
    assert_eq!(padded.at(0, 10, 2), image.at(4, 6, 2));
    let pipeline = Pipeline { mean: vec![0.0; 3], std: vec![1.0; 3], ..Pipeline::cifar_train() };
    let (mut flipped, mut offsets) = (0, std::collections::HashSet::new());
    for seed in 0..200 {
        let out = pipeline.augment(&image, &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!((out.height, out.width), (32, 32));
        let found = (0..=8).flat_map(|t| (0..=8).map(move |l| (t, l))).find_map(|(t, l)| {
            let window = padded.crop(t, l, 32, 32);
            if window == out {
                Some((t, l, false))
            } else if hflip(&window) == out {
                Some((t, l, true))
            } else {
                None
            }
        });
        let (t, l, f) = found.expect("the crop lies inside the padded image");
        offsets.insert((t, l));
        flipped += f as usize;
    }
    assert!((70..130).contains(&flipped), "about half are flipped: {flipped}");
    assert!(offsets.len() > 40, "crops spread over the offsets: {}", offsets.len());
}

#[test]
fn flip_mirrors_columns_and_is_its_own_inverse() {
    let image = numbered(3, 5);
    let flipped = hflip(&image);
    for row in 0..3 {
        for col in 0..5 {
            assert_eq!(flipped.at(row, col, 0), image.at(row, 4 - col, 0));
        }
    }
    assert_eq!(hflip(&flipped), image);
}

#[test]
fn normalisation_uses_the_papers_constants() {
    let white = Image::new(1, 1, 3, vec![255, 0, 128]);
    let mut out = [0f32; 3];
    Pipeline::cifar_test().normalize_into(&white, &mut out);
    let expected = [
        (1.0 - CIFAR_MEAN[0]) / CIFAR_STD[0],
        (0.0 - CIFAR_MEAN[1]) / CIFAR_STD[1],
        (128.0 / 255.0 - CIFAR_MEAN[2]) / CIFAR_STD[2],
    ];
    for (o, e) in out.iter().zip(expected) {
        assert!((o - e).abs() < 1e-5, "{o} vs {e}");
    }
    assert!(
        (CIFAR_MEAN[0] - 125.3 / 255.0).abs() < 1e-7 && (CIFAR_STD[2] - 66.7 / 255.0).abs() < 1e-7
    );
}

#[test]
fn random_resized_crops_respect_scale_and_ratio_and_come_out_224() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..500 {
        let (top, left, h, w) =
            random_resized_crop_box(300, 400, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert!(top + h <= 300 && left + w <= 400);
        let area = (h * w) as f64 / 120_000.0;
        assert!((0.07..=1.0).contains(&area), "area fraction {area}");
        let ratio = w as f64 / h as f64;
        assert!((0.7..=1.4).contains(&ratio), "aspect ratio {ratio}");
    }
    let image = Image::new(300, 400, 3, vec![7; 300 * 400 * 3]);
    let out = Pipeline::imagenet_train().augment(&image, &mut rng);
    assert_eq!((out.height, out.width, out.channels), (224, 224, 3));
    assert!(out.data.iter().all(|&v| v == 7), "resizing a flat image keeps it flat");
}

#[test]
fn evaluation_and_fine_tuning_resize_the_short_side_then_crop_224() {
    let image = numbered(300, 400);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let resized = transform::resize_short_side(&image, 256);
    assert_eq!((resized.height, resized.width), (256, 341));
    for pipeline in
        [Pipeline::imagenet_eval(), Pipeline::finetune_train(), Pipeline::finetune_eval()]
    {
        let out = pipeline.augment(&image, &mut rng);
        assert_eq!((out.height, out.width), (224, 224), "{:?}", pipeline.augment);
    }
    let center = transform::center_crop(&resized, 224);
    assert_eq!(center, resized.crop(16, 58, 224, 224));
}

/// A rank's share of every batch: its contiguous part of the whole batch, with the items and
/// augmentations the whole batch has there, whatever the number of shares (the last batch of
/// 5 items split 6 ways leaves one share empty).
#[test]
fn shares_of_a_batch_are_its_contiguous_parts_with_the_same_items_and_augmentations() {
    let loader = loader(2, 7, false);
    let whole = all_batches(&loader, 2);
    for of in [1, 2, 3, 6] {
        let shares: Vec<Vec<at_data::Batch>> = (0..of)
            .map(|index| {
                let share = at_data::Share { index, of };
                loader.share_from(2, 0, &Device::Cpu, share).map(|b| b.unwrap()).collect()
            })
            .collect();
        for (i, (pixels, labels, indices)) in whole.iter().enumerate() {
            let (mut p, mut l, mut idx) = (vec![], vec![], vec![]);
            let mut offset = 0;
            for share in &shares {
                let b = &share[i];
                assert_eq!((b.whole, b.offset), (indices.len(), offset), "of {of}, batch {i}");
                offset += b.indices.len();
                if !b.indices.is_empty() {
                    p.extend(b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    l.extend(b.labels.to_vec1::<u32>().unwrap());
                }
                idx.extend(&b.indices);
            }
            assert_eq!((&p, &l, &idx), (pixels, labels, indices), "of {of}, batch {i}");
        }
    }
}
