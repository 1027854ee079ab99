//! Data-parallel training's order between ranks, with the ranks as threads of this process
//! (`Threads`, a test double of at-dist's `Collective`: no MPI needed). The numbers of real
//! ranks under `mpirun` are checked in at-train's `tests/mpi.rs`.

use std::sync::{Arc, Barrier, Mutex};

use at_dist::Collective;
use at_trainer::train::{Parallel, RunOptions};
use candle_core::{DType, Result, Tensor};

/// One rank of a job whose ranks are threads: each collective puts this rank's values in its
/// slot, waits for every rank, reads the slots, and waits again before the slots are reused.
struct Threads {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f64>>>,
}

impl Threads {
    /// The ranks of a job of `size`.
    fn job(size: usize) -> Vec<Threads> {
        let shared =
            Arc::new(Shared { barrier: Barrier::new(size), slots: Mutex::new(vec![vec![]; size]) });
        (0..size).map(|rank| Threads { rank, shared: shared.clone() }).collect()
    }

    /// Every rank's `values`, in rank order.
    fn exchange(&self, values: Vec<f64>) -> Vec<Vec<f64>> {
        self.shared.slots.lock().unwrap()[self.rank] = values;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().unwrap().clone();
        self.shared.barrier.wait();
        all
    }
}

/// `t`'s values as f64, and back into `t`'s shape, dtype and device.
fn values(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()
}

fn like(t: &Tensor, values: Vec<f64>) -> Result<Tensor> {
    Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.slots.lock().unwrap().len()
    }

    fn local_rank(&self) -> usize {
        self.rank
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let all = self.exchange(values.to_vec());
        for (i, v) in values.iter_mut().enumerate() {
            *v = all.iter().map(|rank| rank[i]).sum();
        }
        Ok(())
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = values(t)?;
        self.sum_f64(&mut v)?;
        like(t, v)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mut all = self.exchange(values(t)?);
        like(t, all.swap_remove(root))
    }

    fn abort(&self, code: i32) -> ! {
        panic!("rank {} aborted the job with {code}", self.rank)
    }

    fn describe(&self) -> String {
        format!("{} threads", self.size())
    }
}

/// A `repro` job trains its runs one after the other on every rank, and a student reads its
/// teacher's weights, which rank 0 alone writes after the run's last collective: so no rank
/// returns from a run before rank 0 has written them.
#[test]
fn every_rank_returns_from_a_run_after_rank_0_wrote_its_weights_and_result() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r");
    let sets: Vec<String> = [
        "student=nin-thin-nobn",
        "epochs=1",
        "data.train_limit=128",
        "data.test_limit=64",
        "threads=1",
    ]
    .map(String::from)
    .to_vec();
    let config = at_trainer::config::resolve(None, Some("quick"), &sets).unwrap();
    let seen: Vec<(bool, bool)> = std::thread::scope(|s| {
        let ranks: Vec<_> = Threads::job(2)
            .into_iter()
            .map(|rank| {
                let (config, dir) = (&config, &dir);
                s.spawn(move || {
                    let parallel = Parallel::new(Arc::new(rank));
                    let options = RunOptions { parallel: Some(parallel), ..RunOptions::default() };
                    at_trainer::train::train(config, dir, &options).unwrap();
                    (dir.join("model.safetensors").exists(), dir.join("result.json").exists())
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(seen, [(true, true), (true, true)], "(weights, result) as each rank returned");
}
