//! [`Mpi`]: the ranks of an MPI job (Open MPI through rsmpi), collectives on the host.

use std::sync::Mutex;

use candle_core::{DType, Result, Tensor};
use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

use crate::Collective;

/// The world communicator of an MPI job. Collectives run on the host: a device tensor is copied
/// there and back (NCCL keeps GPU gradients on the GPU; this is the CPU's path and the control
/// plane's).
pub struct Mpi {
    world: SimpleCommunicator,
    local_rank: usize,
    /// Serialises the calls: MPI was initialised with `Threading::Serialized`, which allows any
    /// thread (the trainer may run on its second-order thread) but never two at once.
    lock: Mutex<()>,
    // Finalises MPI when dropped, after the communicator: kept last.
    _universe: Universe,
}

// SAFETY: rsmpi's handles are plain MPI handles; MPI was initialised with at least
// `Threading::Serialized` (checked in `Mpi::init`) and every call goes through `lock`, so no
// two threads ever call MPI at once, which is all that level asks.
unsafe impl Send for Mpi {}
// SAFETY: as for `Send`: shared use is serialised by `lock`.
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initialises MPI (once per process) and takes its world. `None` if MPI was initialised
    /// before in this process.
    pub fn init() -> Result<Option<Self>> {
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized)
        else {
            return Ok(None);
        };
        if threading < Threading::Serialized {
            candle_core::bail!(
                "this MPI library gives thread level {threading:?}; data-parallel training \
                 needs Serialized (Open MPI gives it)"
            )
        }
        let world = universe.world();
        // The ranks on this machine: the launcher's variable, else a shared-memory split.
        let local_rank = match crate::launched_local_rank() {
            Some(r) => r,
            None => world.split_shared(world.rank()).rank() as usize,
        };
        Ok(Some(Self { world, local_rank, lock: Mutex::new(()), _universe: universe }))
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Mpi {
    /// Rank `root`'s `bytes` on every rank (NCCL's unique id).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn broadcast_bytes(&self, bytes: &mut [u8], root: usize) -> Result<()> {
        let _serial = self.serial();
        self.world.process_at_rank(root as i32).broadcast_into(bytes);
        Ok(())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let send = values.to_vec();
        let _serial = self.serial();
        self.world.all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        check_dtype(t, "an MPI all-reduce")?;
        let flat = t.flatten_all()?;
        let out = match t.dtype() {
            DType::F32 if t.device().is_cpu() => {
                // Sent from the tensor's own memory: no copy of a gradient buffer on the way out.
                let flat = flat.contiguous()?;
                let (storage, layout) = flat.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    candle_core::bail!("a CPU tensor without CPU storage")
                };
                let n = layout.shape().elem_count();
                let send = &cpu.as_slice::<f32>()?[layout.start_offset()..][..n];
                let mut recv = vec![0f32; n];
                let _serial = self.serial();
                self.world.all_reduce_into(send, &mut recv[..], SystemOperation::sum());
                Tensor::from_vec(recv, t.shape(), t.device())?
            }
            DType::F32 => {
                let send: Vec<f32> = flat.to_vec1()?;
                let mut recv = vec![0f32; send.len()];
                let _serial = self.serial();
                self.world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
                Tensor::from_vec(recv, t.shape(), t.device())?
            }
            _ => {
                let send: Vec<f64> = flat.to_dtype(DType::F64)?.to_vec1()?;
                let mut recv = vec![0f64; send.len()];
                let _serial = self.serial();
                self.world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
                Tensor::from_vec(recv, t.shape(), t.device())?
            }
        };
        Ok(out)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        check_dtype(t, "an MPI broadcast")?;
        let flat = t.flatten_all()?;
        let root = self.world.process_at_rank(root as i32);
        let out = match t.dtype() {
            DType::F32 => {
                let mut buf: Vec<f32> = flat.to_vec1()?;
                let _serial = self.serial();
                root.broadcast_into(&mut buf[..]);
                Tensor::from_vec(buf, t.shape(), t.device())?
            }
            _ => {
                let mut buf: Vec<f64> = flat.to_dtype(DType::F64)?.to_vec1()?;
                let _serial = self.serial();
                root.broadcast_into(&mut buf[..]);
                Tensor::from_vec(buf, t.shape(), t.device())?
            }
        };
        Ok(out)
    }

    fn abort(&self, code: i32) -> ! {
        // Open MPI's launcher tears the job down at the first MPI_Abort and may not forward
        // what a rank wrote just before (its message of why, the one line the user needs).
        // A moment's wait lets the launcher read it first.
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        std::thread::sleep(std::time::Duration::from_millis(500));
        self.world.abort(code)
    }

    fn describe(&self) -> String {
        let library = mpi::environment::library_version().unwrap_or_default();
        let library = library.lines().next().unwrap_or("").trim().to_owned();
        format!("MPI ({library}), {} ranks", self.size())
    }
}

/// Checks that a tensor can go through a collective: f32 or f64.
fn check_dtype(t: &Tensor, what: &str) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(()),
        other => candle_core::bail!("{what} takes f32 or f64 tensors, got {other:?}"),
    }
}
