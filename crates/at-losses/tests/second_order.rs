//! Second-order gradients are on on the process's second-order thread and nowhere else, and
//! where they are off the losses that need them say so. No libtest harness: `main` starts the
//! second-order thread before any other thread exists.

use at_losses::second_order::{SecondOrder, ensure_second_order, is_second_order_thread};
use candle_core::{Device, Var};

fn flag_set_in_environment() -> bool {
    std::env::var_os("CANDLE_GRAD_DO_NOT_DETACH").is_some()
}

fn second_order_is_on_on_its_thread_and_off_elsewhere(so: &SecondOrder) {
    assert!(!flag_set_in_environment(), "start removes the variable it set");
    assert!(!is_second_order_thread(), "off on the main thread");
    assert!(so.run(is_second_order_thread), "on on the second-order thread");
    assert!(!is_second_order_thread(), "still off on the calling thread");
    let later = std::thread::spawn(is_second_order_thread).join().unwrap();
    assert!(!later, "off on threads started afterwards");
    let err = ensure_second_order("gradient attention transfer").unwrap_err().to_string();
    assert!(err.contains("gradient attention transfer needs second-order gradients"), "{err}");
    assert!(err.contains("SecondOrder::run"), "{err}");
    so.run(|| ensure_second_order("gradient attention transfer")).expect("on its thread");
}

/// `d/dx sum(J^2)` with `J = d/dx sum((2x)^3) = 24 x^2`, so `sum(J^2) = 576 sum(x^4)` and the
/// result is `2304 x^3`; `None` where candle detached the inner gradient.
fn second_derivative(values: &[f64]) -> Option<Vec<f64>> {
    let x = Var::new(values, &Device::Cpu).unwrap();
    let u = (x.as_tensor() * 2.0).unwrap();
    let first = u.powf(3.0).unwrap().sum_all().unwrap().backward().unwrap();
    let j = first.get(&x).unwrap();
    let second = j.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    second.get(&x).map(|g| g.to_vec1().unwrap())
}

fn double_backpropagation_is_exact_on_its_thread_and_missing_elsewhere(so: &SecondOrder) {
    let values = [0.5f64, -1.0, 2.0];
    let got = so.run(|| second_derivative(&values)).expect("a second-order gradient");
    for (g, v) in got.iter().zip(values) {
        assert!((g - 2304.0 * v * v * v).abs() < 1e-6, "{got:?}");
    }
    assert_eq!(second_derivative(&values), None, "candle detaches on the main thread");
}

fn a_panic_on_the_second_order_thread_reaches_the_caller(so: &SecondOrder) {
    let caught =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| so.run(|| panic!("inside"))));
    assert!(caught.is_err());
    assert!(so.run(is_second_order_thread), "the thread still works after a panic");
    assert_eq!(so.run(|| so.run(|| 7)), 7, "a nested run executes in place");
}

fn starting_a_second_one_with_threads_alive_is_refused(_: &SecondOrder) {
    let err = SecondOrder::start().unwrap_err().to_string();
    assert!(err.contains("first in main") && err.contains("harness = false"), "{err}");
}

fn main() -> std::process::ExitCode {
    at_losses::second_order::run_tests(&[
        (
            "second_order_is_on_on_its_thread_and_off_elsewhere",
            second_order_is_on_on_its_thread_and_off_elsewhere,
        ),
        (
            "double_backpropagation_is_exact_on_its_thread_and_missing_elsewhere",
            double_backpropagation_is_exact_on_its_thread_and_missing_elsewhere,
        ),
        (
            "a_panic_on_the_second_order_thread_reaches_the_caller",
            a_panic_on_the_second_order_thread_reaches_the_caller,
        ),
        (
            "starting_a_second_one_with_threads_alive_is_refused",
            starting_a_second_one_with_threads_alive_is_refused,
        ),
    ])
}
