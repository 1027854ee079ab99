//! Stochastic gradient descent as `torch.optim.SGD` (candle-nn's has no momentum and no weight
//! decay), and the learning-rate schedules of the paper's recipes.

use std::collections::HashMap;

use at_models::is_buffer;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

/// The hyper-parameters of [`Sgd`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 disables momentum).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty added to every parameter's gradient (batch-norm weights and biases included,
    /// as the authors' code; running statistics are never touched).
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    /// The CIFAR recipe: lr 0.1, momentum 0.9, no Nesterov, weight decay 5e-4.
    fn default() -> Self {
        Self { lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 5e-4 }
    }
}

/// SGD with momentum, Nesterov and weight decay, updating a [`VarMap`]'s parameters in place.
///
/// For each parameter `p` with gradient `g`: `d = g + wd * p`; with momentum,
/// `buf = momentum * buf + d` (`buf = d` at the first step) and `d = buf`, or
/// `d = d + momentum * buf` with Nesterov; then `p -= lr * d`. Parameters without a gradient
/// (frozen, or unused by the loss) are left alone, and so is their momentum.
pub struct Sgd {
    params: Vec<(String, Var)>,
    momentum: HashMap<String, Tensor>,
    config: SgdConfig,
}

impl Sgd {
    /// An optimiser over every parameter of `varmap` except batch-norm running statistics.
    pub fn new(varmap: &VarMap, config: SgdConfig) -> Self {
        let data = varmap.data().lock().expect("the VarMap lock is not poisoned");
        let mut params: Vec<(String, Var)> = data
            .iter()
            .filter(|(name, _)| !is_buffer(name))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Self { params, momentum: HashMap::new(), config }
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Sets the learning rate (schedules call this once per epoch).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// The parameters it updates, sorted by name.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update from `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let grads: Vec<Option<Tensor>> =
            self.params.iter().map(|(_, var)| grads.get(var).cloned()).collect();
        self.step_each(&grads)
    }

    /// One update from the gradient of each parameter of [`Sgd::params`], in that order
    /// (`None`: no gradient, the parameter and its momentum are left alone).
    pub fn step_each(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        let SgdConfig { lr, momentum, nesterov, weight_decay } = self.config;
        if grads.len() != self.params.len() {
            candle_core::bail!("{} gradients for {} parameters", grads.len(), self.params.len())
        }
        let step = at_kernels::SgdStep { lr, momentum, nesterov, weight_decay };
        for ((name, var), grad) in self.params.iter().zip(grads) {
            let Some(grad) = grad else { continue };
            if momentum != 0.0 && !self.momentum.contains_key(name) {
                // `buf = d` at the first step, as `momentum * 0 + d`.
                self.momentum.insert(name.clone(), var.as_tensor().zeros_like()?);
            }
            let buf = self.momentum.get(name);
            // In place on the CPU (the same values to the bit), tensor ops elsewhere.
            if at_kernels::sgd_step_in_place(var.as_tensor(), grad, buf, step)? {
                continue;
            }
            let p = var.as_tensor().detach();
            let mut d = grad.detach();
            if weight_decay != 0.0 {
                d = (d + (&p * weight_decay)?)?;
            }
            if let Some(buf) = buf {
                let buf = ((buf * momentum)? + &d)?;
                d = if nesterov { (d + (&buf * momentum)?)? } else { buf.clone() };
                self.momentum.insert(name.clone(), buf);
            }
            var.set(&(p - (d * lr)?)?)?;
        }
        Ok(())
    }

    /// The momentum buffers, by parameter name: what a checkpoint must keep.
    pub fn state(&self) -> &HashMap<String, Tensor> {
        &self.momentum
    }

    /// Restores momentum buffers saved from [`Sgd::state`].
    pub fn load_state(&mut self, state: HashMap<String, Tensor>) -> Result<()> {
        for (name, buf) in &state {
            let Some((_, var)) = self.params.iter().find(|(n, _)| n == name) else {
                candle_core::bail!(
                    "optimizer state for `{name}`, which is not a parameter of this model"
                )
            };
            if buf.dims() != var.dims() {
                candle_core::bail!(
                    "optimizer state for `{name}` has shape {:?}, the parameter {:?}",
                    buf.dims(),
                    var.dims()
                )
            }
        }
        self.momentum = state;
        Ok(())
    }
}

/// How the learning rate changes over epochs.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// `base * gamma^k` where `k` counts the milestones already passed (`MultiStepLR`).
    MultiStep {
        /// Epochs at which the rate is multiplied by `gamma`.
        milestones: Vec<usize>,
        /// The factor (0.2 in the CIFAR recipe, 0.1 on ImageNet).
        gamma: f64,
    },
    /// `base * (1 + cos(pi * epoch / epochs)) / 2` (`CosineAnnealingLR` to 0).
    Cosine {
        /// The length of the run.
        epochs: usize,
    },
    /// The base rate throughout.
    Constant,
}

impl Schedule {
    /// The learning rate of `epoch` (counted from 0).
    pub fn lr(&self, base: f64, epoch: usize) -> f64 {
        match self {
            Schedule::MultiStep { milestones, gamma } => {
                base * gamma.powi(milestones.iter().filter(|&&m| m <= epoch).count() as i32)
            }
            Schedule::Cosine { epochs } => {
                base * (1.0 + (std::f64::consts::PI * epoch as f64 / (*epochs).max(1) as f64).cos())
                    / 2.0
            }
            Schedule::Constant => base,
        }
    }
}
