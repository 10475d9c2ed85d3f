//! The fuzz binary's allocator: the system's, except that an allocation larger than any
//! input here could justify is refused, as a machine out of memory would refuse it. Code
//! that asks with `try_reserve` gets an error back; anything else aborts the process, which
//! is the bug: the inputs being fuzzed at that moment are saved first, for replay.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::Mutex;

/// Far more than loading, tokenizing or rendering a fuzz input of a few tens of kilobytes
/// needs; far less than an attacker's count would ask for.
pub const LIMIT: usize = 256 << 20;

/// An input being run, and where to save it.
pub type Running = Mutex<Option<(PathBuf, Vec<u8>)>>;

/// The input each fuzz target is running.
pub static CURRENT: [Running; 4] = [Mutex::new(None), Mutex::new(None), Mutex::new(None), Mutex::new(None)];

pub struct Guard;

fn refuse(size: usize) {
    for slot in &CURRENT {
        // `try_lock`: the thread asking may hold the lock (it is copying the input).
        if let Ok(current) = slot.try_lock() {
            if let Some((path, bytes)) = current.as_ref() {
                let _ = std::fs::create_dir_all(path.parent().unwrap_or(path));
                let _ = std::fs::write(path, bytes);
                eprintln!("fuzz: refused an allocation of {size} bytes; the input being run is in {}", path.display());
            }
        }
    }
}

// SAFETY: every call is forwarded to the system allocator, or answered with null (which
// the `GlobalAlloc` contract allows for any request).
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > LIMIT {
            refuse(new_size);
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}
