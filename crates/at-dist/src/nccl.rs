//! [`Nccl`]: GPU tensors summed and broadcast by NCCL on the GPUs, the job's control plane
//! (ranks, NCCL's bootstrap, host sums, abort) on MPI.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use crate::{Collective, Mpi};

/// NCCL for CUDA tensors, MPI for the rest. The communicator is made at the first collective
/// on a CUDA tensor, on that tensor's device and stream (the one the training runs on), from
/// the unique id rank 0 made and MPI broadcast at [`Nccl::init`]. One rank per GPU.
pub struct Nccl {
    mpi: Mpi,
    id: Id,
    /// Made on first use; serialised by the lock.
    comm: Mutex<Option<Comm>>,
}

// SAFETY: `Comm` holds NCCL's communicator pointer; every use goes through the `comm` lock (and
// MPI's calls through `Mpi`'s), so no two threads use it at once, which NCCL allows.
unsafe impl Send for Nccl {}
// SAFETY: as for `Send`.
unsafe impl Sync for Nccl {}

impl Nccl {
    /// NCCL over the ranks of `mpi`: rank 0 makes NCCL's unique id and MPI carries it to all.
    pub fn init(mpi: Mpi) -> Result<Self> {
        let mut bytes = [0u8; 128];
        if mpi.rank() == 0 {
            let id = Id::new().map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
            for (b, c) in bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        mpi.broadcast_bytes(&mut bytes, 0)?;
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        Ok(Self { mpi, id, comm: Mutex::new(None) })
    }

    fn on_gpu(&self, t: &Tensor, root: Option<usize>) -> Result<Tensor> {
        t.contiguous()?.apply_op1_no_bwd(&Op { nccl: self, root })
    }
}

/// The NCCL call as a candle op on the tensor's storage: a sum over the ranks (`root: None`)
/// or rank `root`'s values.
struct Op<'a> {
    nccl: &'a Nccl,
    root: Option<usize>,
}

fn nccl_error(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL: {e:?}"))
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL takes CUDA tensors (host tensors go through MPI)")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let device = storage.device().clone();
        let mut guard = self.nccl.comm.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let (rank, size) = (self.nccl.mpi.rank(), self.nccl.mpi.size());
            let comm = Comm::from_rank(device.cuda_stream(), rank, size, self.nccl.id)
                .map_err(nccl_error)?;
            *guard = Some(comm);
        }
        let comm = guard.as_ref().expect("made above");
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL takes contiguous tensors")
        };
        let root = self.root.map(|r| r as i32);
        let is_root = self.root == Some(self.nccl.mpi.rank());
        macro_rules! run {
            ($t:ty) => {{
                let src = storage.as_cuda_slice::<$t>()?.slice(start..end);
                // SAFETY: every element is written by the collective before it is read.
                let mut dst = unsafe { device.alloc::<$t>(end - start) }?;
                match root {
                    None => comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
                    Some(root) => comm.broadcast(is_root.then_some(&src), &mut dst, root),
                }
                .map_err(nccl_error)?;
                CudaStorage::wrap_cuda_slice(dst, device.clone())
            }};
        }
        let out = match storage.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            other => candle_core::bail!("NCCL here takes f32 or f64 tensors, got {other:?}"),
        };
        Ok((out, layout.shape().clone()))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }

    fn size(&self) -> usize {
        self.mpi.size()
    }

    fn local_rank(&self) -> usize {
        self.mpi.local_rank()
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.mpi.sum_f64(values)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        match t.device() {
            candle_core::Device::Cuda(_) => self.on_gpu(t, None),
            _ => self.mpi.all_reduce_sum(t),
        }
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        match t.device() {
            candle_core::Device::Cuda(_) => self.on_gpu(t, Some(root)),
            _ => self.mpi.broadcast(t, root),
        }
    }

    fn abort(&self, code: i32) -> ! {
        self.mpi.abort(code)
    }

    fn describe(&self) -> String {
        format!("NCCL on the GPUs, {}", self.mpi.describe())
    }
}
