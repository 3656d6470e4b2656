//! Panics inside model code, caught so that one request fails instead of a worker or a load.
//!
//! The engine logs each caught panic once, with its model and stage. [`install_hook`] keeps
//! the runtime from printing a second, context-free report for those: while [`catch`] runs,
//! the hook only records where the panic happened; every other panic gets the default report.

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};

thread_local! {
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A caught panic: its message and, with the hook installed, where it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Caught {
    pub message: String,
    pub location: Option<String>,
}

/// Installs the process's panic hook (the binary calls it once at start).
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if CATCHING.with(Cell::get) {
            let at = info.location().map(|l| l.to_string());
            LOCATION.with(|l| *l.borrow_mut() = at);
        } else {
            default(info);
        }
    }));
}

/// Runs `f`; a panic inside it becomes a [`Caught`].
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, Caught> {
    let was = CATCHING.with(|c| c.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(was));
    result.map_err(|p| Caught {
        message: message(p.as_ref()),
        location: LOCATION.with(|l| l.borrow_mut().take()),
    })
}

/// The text of a panic's payload.
fn message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(catch(|| 5), Ok(5));
        let caught = catch(|| -> () { panic!("broken {}", 7) }).unwrap_err();
        assert_eq!(caught.message, "broken 7");
    }
}
