//! Collectives for data-parallel training with candle, on the engines clusters already run:
//! [`Solo`] (one process, every collective the identity); with the `mpi` feature, `Mpi` (Open
//! MPI or any MPI through rsmpi: the launcher's ranks, `mpirun`, `srun`); with `nccl`, `Nccl`
//! (NCCL for CUDA tensors, through candle-core's `nccl` feature and its cudarc; MPI for the
//! control plane and NCCL's bootstrap).
//!
//! The trainer needs four things of a collective, all of them blocking and called in the same
//! order on every rank: a sum over the ranks of a tensor (the gradients in one flat buffer, the
//! step's metric sums), a sum of a few host numbers (stop flags, evaluation counts), a broadcast
//! from one rank (the parameters at the start, the batch-norm statistics before evaluation and
//! checkpoints) and an abort that ends every rank (an error on one rank must not leave the others
//! waiting in a collective).

use candle_core::{Result, Tensor};

#[cfg(feature = "mpi")]
mod mpi_world;
#[cfg(feature = "mpi")]
pub use mpi_world::Mpi;
#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
pub use nccl::Nccl;

/// The ranks of a data-parallel job and what they do together. Every method is collective
/// (except [`Collective::rank`], [`Collective::size`], [`Collective::local_rank`] and
/// [`Collective::describe`]): all ranks call it, in the same order.
pub trait Collective: Send + Sync {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn size(&self) -> usize;

    /// This process's rank among those on its machine: which GPU it takes.
    fn local_rank(&self) -> usize;

    /// Sums `values` element-wise over the ranks, in place.
    fn sum_f64(&self, values: &mut [f64]) -> Result<()>;

    /// `t` (f32 or f64, any shape) summed element-wise over the ranks, on `t`'s device.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Rank `root`'s `t` on every rank (the same shape and dtype on each), on `t`'s device.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;

    /// Ends every rank of the job with `code`; the caller has said why.
    fn abort(&self, code: i32) -> !;

    /// The engine and the ranks, for a log line.
    fn describe(&self) -> String;
}

/// One process: every collective is the identity, and [`Collective::abort`] exits.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn local_rank(&self) -> usize {
        0
    }

    fn sum_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }

    fn describe(&self) -> String {
        "one process".to_owned()
    }
}

/// Whether `flag` is set on any rank.
pub fn any(world: &dyn Collective, flag: bool) -> Result<bool> {
    Ok(any_each(world, [flag])?[0])
}

/// Every rank waits here until every rank has come (a one-value sum: an empty one may return at
/// once).
pub fn barrier(world: &dyn Collective) -> Result<()> {
    any(world, false).map(drop)
}

/// For each of `flags`, whether it is set on any rank: several decisions agreed in one
/// collective.
pub fn any_each<const N: usize>(world: &dyn Collective, flags: [bool; N]) -> Result<[bool; N]> {
    let mut v = flags.map(|f| f as u8 as f64);
    world.sum_f64(&mut v)?;
    Ok(v.map(|s| s > 0.0))
}

/// The part of `len` items that rank `part` of `parts` takes: contiguous, in order, the sizes
/// differing by one at most (`len * part / parts ..  len * (part + 1) / parts`).
pub fn part_of(len: usize, part: usize, parts: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    len * part / parts..len * (part + 1) / parts
}

/// The launcher's ranks of this process when it was started by one (`mpirun`, `srun`, a PMI
/// launcher), read from the environment they set: `(rank, size)`; `None` for a process started
/// alone.
pub fn launched_rank() -> Option<(usize, usize)> {
    let var = |name: &str| std::env::var(name).ok()?.trim().parse::<usize>().ok();
    let pairs = [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMIX_RANK", "PMIX_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ];
    pairs.iter().find_map(|(rank, size)| Some((var(rank)?, var(size)?)))
}

/// The machine-local rank the launcher set, if it did.
pub fn launched_local_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_contiguous_cover_everything_and_differ_by_one_at_most() {
        for len in 0..40 {
            for parts in 1..6 {
                let ranges: Vec<_> = (0..parts).map(|p| part_of(len, p, parts)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[parts - 1].end, len);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "{len} in {parts}: {sizes:?}");
            }
        }
    }

    #[test]
    fn solo_is_the_identity() {
        let t = Tensor::new(&[1f32, 2., 3.], &candle_core::Device::Cpu).unwrap();
        let world = Solo;
        assert_eq!(world.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap(), [1., 2., 3.]);
        assert_eq!(world.broadcast(&t, 0).unwrap().to_vec1::<f32>().unwrap(), [1., 2., 3.]);
        assert!(any(&world, true).unwrap() && !any(&world, false).unwrap());
        assert_eq!((world.rank(), world.size()), (0, 1));
    }
}
