//! Tells the tests whether this machine can run the gather kernel (AVX-512F, or AVX2 with FMA),
//! so that its tests are reported as ignored (with the reason) on a CPU without either, instead
//! of passing without having run. The kernels themselves decide at run time (`gather::isa`).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(at_no_gather)");
    #[cfg(target_arch = "x86_64")]
    let has_gather = std::is_x86_feature_detected!("avx512f")
        || (std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"));
    #[cfg(not(target_arch = "x86_64"))]
    let has_gather = false;
    // Build scripts run on the host: the right answer unless cross-compiling, when the gather
    // tests then simply stay ignored.
    let cross = std::env::var("HOST").ok() != std::env::var("TARGET").ok();
    if !has_gather || cross {
        println!("cargo::rustc-cfg=at_no_gather");
    }
}
