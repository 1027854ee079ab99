//! Tells the tests whether this machine has AVX-512F, so that the tests of the AVX-512 gather
//! kernel are reported as ignored (with the reason) on a CPU without it, instead of passing
//! without having run. The kernels themselves decide at run time (`gather::available`).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(at_no_avx512)");
    #[cfg(target_arch = "x86_64")]
    let has_avx512 = std::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let has_avx512 = false;
    // Build scripts run on the host: the right answer unless cross-compiling, when the gather
    // tests then simply stay ignored.
    let cross = std::env::var("HOST").ok() != std::env::var("TARGET").ok();
    if !has_avx512 || cross {
        println!("cargo::rustc-cfg=at_no_avx512");
    }
}
