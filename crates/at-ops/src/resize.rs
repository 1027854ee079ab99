//! Resizing attention maps so that a student and a teacher of different resolution can be paired.
//!
//! Both modes are separable linear maps, so a resize is two small matrix products,
//! `R_h · Q · R_wᵀ`: differentiable by candle's autograd and the same on every device.

use candle_core::{Result, Tensor, bail};

/// How a map is brought to another spatial size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Resize {
    /// Averages over the source cells each target cell covers, as PyTorch's
    /// `interpolate(mode="area")` (adaptive average pooling). Exact for integer factors.
    #[default]
    Area,
    /// Bilinear interpolation with half-pixel centres, as PyTorch's
    /// `interpolate(mode="bilinear", align_corners=False)` without antialiasing.
    Bilinear,
}

/// Resizes maps `[B, H, W]` to `[B, h, w]`. Returns the input unchanged when the size matches.
pub fn resize_map(map: &Tensor, (h, w): (usize, usize), mode: Resize) -> Result<Tensor> {
    let (_b, src_h, src_w) = map.dims3().map_err(|_| {
        candle_core::Error::Msg(format!(
            "resize_map needs maps [B, H, W], got shape {:?}",
            map.dims()
        ))
    })?;
    if (src_h, src_w) == (h, w) {
        return Ok(map.clone());
    }
    if h == 0 || w == 0 || src_h == 0 || src_w == 0 {
        bail!("cannot resize maps of size {src_h}x{src_w} to {h}x{w}")
    }
    let rows = weights(src_h, h, mode, map)?; // [h, H]
    let cols = weights(src_w, w, mode, map)?.t()?; // [W, w]
    let map = map.contiguous()?;
    rows.broadcast_left(map.dim(0)?)?.contiguous()?.matmul(&map)?.broadcast_matmul(&cols)
}

/// The `[dst, src]` matrix that resizes one axis, in the dtype and on the device of `like`.
fn weights(src: usize, dst: usize, mode: Resize, like: &Tensor) -> Result<Tensor> {
    let m = match mode {
        Resize::Area => area_weights(src, dst),
        Resize::Bilinear => bilinear_weights(src, dst),
    };
    Tensor::from_vec(m, (dst, src), like.device())?.to_dtype(like.dtype())
}

/// Target cell `i` averages source cells `floor(i * src / dst) .. ceil((i + 1) * src / dst)`.
fn area_weights(src: usize, dst: usize) -> Vec<f64> {
    let mut m = vec![0.0; dst * src];
    for i in 0..dst {
        let start = i * src / dst;
        let end = ((i + 1) * src).div_ceil(dst);
        let weight = 1.0 / (end - start) as f64;
        for j in start..end {
            m[i * src + j] = weight;
        }
    }
    m
}

/// Target cell `i` samples the source at `(i + 0.5) * src / dst - 0.5`, clamped at the borders.
fn bilinear_weights(src: usize, dst: usize) -> Vec<f64> {
    let scale = src as f64 / dst as f64;
    let mut m = vec![0.0; dst * src];
    for i in 0..dst {
        let x = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let j0 = (x.floor() as usize).min(src - 1);
        let j1 = (j0 + 1).min(src - 1);
        let frac = x - j0 as f64;
        m[i * src + j0] += 1.0 - frac;
        m[i * src + j1] += frac;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_of_the_resize_matrices_sums_to_one() {
        for (src, dst) in [(16, 8), (8, 16), (7, 3), (3, 7), (5, 5), (1, 4), (4, 1)] {
            for m in [area_weights(src, dst), bilinear_weights(src, dst)] {
                for row in m.chunks(src) {
                    let total: f64 = row.iter().sum();
                    assert!((total - 1.0).abs() < 1e-12, "{src}->{dst}: {row:?}");
                }
            }
        }
    }

    #[test]
    fn halving_by_area_averages_2x2_blocks() {
        let m = area_weights(4, 2);
        assert_eq!(m, vec![0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]);
    }
}
