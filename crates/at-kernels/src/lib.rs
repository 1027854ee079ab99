//! Fast CPU kernels for the training loop of attention-transfer, as candle custom ops.
//!
//! candle 0.11's CPU convolution computes the input gradient with a direct loop and builds its
//! im2col matrices element by element; [`conv2d`] replaces it with one GEMM per image (an
//! AVX-512 kernel that reads the image's rows in place where the CPU has it, `gemm` elsewhere),
//! images spread over rayon's threads, for the forward pass and both gradients, and stays
//! differentiable to any order (see [`conv`]). [`batch_norm_train`] fuses training-mode batch
//! norm (and the ReLU after it) into one op with a two-pass backward (see [`norm`]).
//! [`preact_blocks_train`] makes pre-activation residual blocks (a WRN group) one op, so that
//! candle's backward pass accumulates one gradient per group instead of six per block (see
//! [`block`]); [`preact_block_eval`] is the evaluation-mode block, forward only
//! ([`preact_block_eval_map`] with its output's attention map). [`basic_blocks_train`] does the
//! same for a layer of a ResNet's post-activation basic blocks (see [`basic_block`]).
//! [`at_distance`] fuses the
//! attention maps' normalisation and distance; [`channel_power_deferred`] makes an attention map
//! whose gradient the op consuming its activation adds in its own backward pass (see
//! [`attention`]). Other devices and dtypes go to candle's own ops.
//!
//! The plain candle ops remain the reference: a model built with [`Backend::Candle`] calls them
//! instead (tests compare the two; benchmarks time both). [`second_order`] owns the process's
//! one thread with second-order gradients and the probe the kernels ask.
#![deny(missing_docs)]

pub mod attention;
pub mod basic_block;
pub mod block;
pub mod conv;
mod gather;
pub mod norm;
pub mod pool;
pub mod second_order;
pub mod sgd;
pub mod stem;

use std::mem::MaybeUninit;

use candle_core::{Layout, Result, bail};
use rayon::prelude::*;

pub use attention::{
    AT_OPS_KERNELS, MapGradient, at_distance, channel_power, channel_power_deferred,
};
pub use basic_block::{
    BasicBlock, BasicBlockStats, ParamGrads, basic_block_eval, basic_blocks_train,
};
pub use block::{
    PreactBlock, preact_block_eval, preact_block_eval_map, preact_block_train, preact_blocks_train,
    preact_blocks_train_with,
};
pub use conv::{conv2d, conv2d_device, conv2d_input_grad, conv2d_weight_grad};
pub use gather::{Isa, isa};
pub use norm::{BatchStats, batch_norm_eval, batch_norm_train, batch_norm_train_with};
pub use pool::max_pool2d;
pub use sgd::{SgdStep, sgd_step_in_place};
pub use stem::{Stem, stem_train};

/// The elements of a contiguous operand; `what` names it in the error otherwise.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what} must be contiguous"),
    }
}

/// A vector of `len` elements made chunk by chunk (`chunk` elements, the last one shorter) on
/// rayon's threads: each chunk is zeroed and handed to `f(state, index, chunk)`, `state` coming
/// from `init` once per rayon job. Unlike `vec![0; len]`, whose zero fill is one serial pass over
/// the whole (often activation-sized, cold) buffer on the calling thread, each chunk is zeroed
/// in parallel just before `f` writes it, while it is in cache.
pub(crate) fn par_chunks_zeroed<T, S>(
    len: usize,
    chunk: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) -> Vec<T>
where
    T: Copy + Default + Send + Sync,
{
    let zeroed = |state: &mut S, i: usize, out: &mut [MaybeUninit<T>]| {
        out.fill(MaybeUninit::new(T::default()));
        // SAFETY: every element of `out` was initialised on the line above.
        f(state, i, unsafe { assume_init_mut(out) });
    };
    // SAFETY: `zeroed` initialises its whole chunk before `f` sees it.
    unsafe { par_chunks_uninit(len, chunk, init, zeroed) }
}

/// Like [`par_chunks_zeroed`] for outputs that are written whole: `f` gets each chunk
/// uninitialised, which saves the zero fill (the first touch of fresh memory, a few percent of
/// a training step).
///
/// # Safety
///
/// `f` must initialise every element of each chunk it is given.
pub(crate) unsafe fn par_chunks_uninit<T, S>(
    len: usize,
    chunk: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T>
where
    T: Send + Sync,
{
    let mut v: Vec<T> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each_init(init, |state, (i, out)| f(state, i, out));
    // SAFETY: the chunks cover `0..len` and `f` initialised each (the caller's promise).
    unsafe { v.set_len(len) };
    v
}

/// `v` as initialised values, in the same allocation.
///
/// # Safety
///
/// Every element of `v` must have been initialised.
pub(crate) unsafe fn assume_init_vec<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, so the allocation is that of a `Vec<T>`
    // of the same length and capacity, and the caller promises initialised elements.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) }
}

/// `out` as initialised values.
///
/// # Safety
///
/// Every element of `out` must have been initialised.
pub(crate) unsafe fn assume_init_mut<T>(out: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, and the caller promises initialised
    // elements.
    unsafe { &mut *(out as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Writes `value(i)` into every element `i` of `out`, which is then initialised.
pub(crate) fn write_each<T>(out: &mut [MaybeUninit<T>], mut value: impl FnMut(usize) -> T) {
    for (i, o) in out.iter_mut().enumerate() {
        o.write(value(i));
    }
}

/// Which implementation a model's layers run: at-kernels' ops where they apply (the default),
/// candle's own ops everywhere (the reference the tests compare against and the benchmarks
/// time), or the mix a CUDA or Metal device runs (on any device, so that the CPU can test it).
/// Chosen once where a model is built (at-models' `ModelOptions::backend`) and carried by each
/// layer; nothing in this crate reads a global switch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Backend {
    /// at-kernels' ops where they apply (f32/f64 on the CPU, first-order threads for the ops
    /// whose backward builds no graph), candle's elsewhere.
    #[default]
    Kernels,
    /// candle's own ops everywhere.
    Candle,
    /// What `Kernels` amounts to off the CPU, on any device: the convolution of
    /// [`conv2d_device`] (candle's, tied to a backward made of convolutions), every other op
    /// candle's (batch norm, the attention maps taken from the group outputs). The CPU runs a
    /// GPU's op mix with it (at-trainer's `check-device --device cpu` and its tests).
    Device,
}

impl Backend {
    /// Whether the fast kernels may be tried.
    pub fn kernels(self) -> bool {
        self == Self::Kernels
    }
}

/// glibc's largest accepted mmap threshold on 64-bit targets (`4 * 1024 * 1024 * sizeof(long)`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Keeps freed tensor buffers in the process instead of handing them back to the kernel.
///
/// glibc serves large allocations (a training step's activations and gradients) with `mmap` and
/// returns them with `munmap` when freed, so every step pays for the kernel zeroing fresh pages
/// again; raising the mmap and trim thresholds lets `malloc` reuse that memory. Call it once at
/// start-up, before the first tensor. Returns whether it applied (glibc on Linux only).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's allocation thresholds; it is safe to call at any
        // time, and these values are in its documented range.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// For the tests of the gather kernel, which are ignored (`cfg(at_no_gather)`, set by the build
/// script) where the build machine has neither AVX-512F nor AVX2 with FMA: whether they run
/// (not where `AT_KERNELS_ISA=portable` forces the portable path: they say so and return),
/// failing loudly if they would run on a CPU without the kernel's instructions.
#[cfg(test)]
pub(crate) fn gather_tests_run() -> bool {
    if std::env::var("AT_KERNELS_ISA").as_deref() == Ok("portable") {
        eprintln!("AT_KERNELS_ISA=portable: this test of the gather kernel does not run");
        return false;
    }
    assert!(
        gather::available(),
        "this test needs AVX2 and FMA or AVX-512F, which this CPU lacks (the build ran on \
         another machine?): rebuild here, and the gather tests are reported as ignored"
    );
    true
}
