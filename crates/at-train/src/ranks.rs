//! The ranks of a data-parallel job, when a launcher (`mpirun`, `srun`) started this process:
//! the one place the binary joins them (at-dist's MPI world, with the `mpi` feature).

use anyhow::bail;
use at_trainer::config::DeviceSpec;
use at_trainer::train::{Observer, Parallel};

/// The job this process is a rank of, or `None` when it runs alone (no launcher, or one rank).
/// A launcher's job with a build that lacks MPI is refused, so that its ranks do not each
/// train the whole run into the same directory.
///
/// `AT_DATA_PARALLEL=1` joins even a job of one rank, or a process no launcher started (MPI's
/// singleton): what checks the collective's path on a machine with one GPU.
pub fn join() -> anyhow::Result<Option<Parallel>> {
    let forced = std::env::var("AT_DATA_PARALLEL").is_ok_and(|v| v.trim() == "1");
    let launched = at_dist::launched_rank().filter(|&(_, size)| size > 1 || forced);
    let Some((rank, size)) = launched.or(forced.then_some((0, 1))) else {
        return Ok(None);
    };
    #[cfg(feature = "mpi")]
    {
        let Some(mpi) = at_dist::Mpi::init()? else {
            bail!("rank {rank}: MPI was initialised twice in this process")
        };
        use at_dist::Collective;
        if mpi.size() != size {
            bail!(
                "rank {rank}: the launcher says {size} ranks, MPI {}: is this at-train linked to \
                 the launcher's MPI?",
                mpi.size()
            )
        }
        // With NCCL, GPU tensors go through it and the rest through MPI.
        #[cfg(feature = "nccl")]
        let world = std::sync::Arc::new(at_dist::Nccl::init(mpi)?);
        #[cfg(not(feature = "nccl"))]
        let world = std::sync::Arc::new(mpi);
        Ok(Some(Parallel::new(world)))
    }
    #[cfg(not(feature = "mpi"))]
    {
        bail!(
            "rank {rank} of {size}: this at-train was started by an MPI launcher but built \
             without MPI; build it with `cargo build --release -p at-train --features mpi` (Open \
             MPI's libopenmpi-dev installed), or run it without mpirun"
        )
    }
}

/// `device` for this rank: plain `cuda` takes the GPU of the rank's place on its machine.
pub fn device_of(device: Option<DeviceSpec>, parallel: Option<&Parallel>) -> Option<DeviceSpec> {
    match (device, parallel) {
        (Some(DeviceSpec::Cuda(0)), Some(p)) => Some(DeviceSpec::Cuda(p.world.local_rank())),
        (device, _) => device,
    }
}

/// What ranks other than 0 show of their progress: nothing (rank 0 speaks for the job).
pub struct Quiet;

impl Observer for Quiet {
    fn batch_done(&self, _: usize, _: usize, _: usize, _: Option<f64>, _: f64) {}
    fn epoch_finished(&self, _: &at_trainer::train::EpochMetrics, _: usize) {}
    fn stopped(&self, _: usize, _: usize, _: &std::path::Path) {}
}
