//! Second-order gradients are on inside `with_second_order` and nowhere else, and where they are
//! off the losses that need them say so.

use at_losses::second_order::{ensure_second_order, second_order_enabled, with_second_order};
use candle_core::{Device, Var};

fn flag_set_in_environment() -> bool {
    std::env::var_os("CANDLE_GRAD_DO_NOT_DETACH").is_some()
}

#[test]
fn second_order_is_on_inside_the_scope_and_off_elsewhere() {
    if flag_set_in_environment() {
        return; // The whole process was started with the flag: nothing is off to check.
    }
    assert!(!second_order_enabled(), "off on an ordinary thread");
    assert!(with_second_order(second_order_enabled), "on inside the scope");
    assert!(!second_order_enabled(), "still off on the calling thread");
    let later = std::thread::spawn(second_order_enabled).join().unwrap();
    assert!(!later, "off on threads started afterwards");
    let err = ensure_second_order("gradient attention transfer").unwrap_err().to_string();
    assert!(err.contains("gradient attention transfer needs second-order gradients"), "{err}");
    assert!(err.contains("with_second_order"), "{err}");
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

#[test]
fn double_backpropagation_inside_the_scope_is_exact_and_missing_outside() {
    let values = [0.5f64, -1.0, 2.0];
    let got = with_second_order(|| second_derivative(&values)).expect("a second-order gradient");
    for (g, v) in got.iter().zip(values) {
        assert!((g - 2304.0 * v * v * v).abs() < 1e-6, "{got:?}");
    }
    if !flag_set_in_environment() {
        // Probed first (under the lock), so this thread's setting is the ordinary one.
        assert!(!second_order_enabled());
        assert_eq!(second_derivative(&values), None, "candle detaches outside the scope");
    }
}

#[test]
fn a_panic_inside_the_scope_reaches_the_caller() {
    let caught = std::panic::catch_unwind(|| with_second_order(|| panic!("inside")));
    assert!(caught.is_err());
    assert!(with_second_order(second_order_enabled), "the scope still works after a panic");
}
