//! The wasm32 side: host imports (ABI v1), the allocator, the panic handler and the entry
//! points the `procedure!` macro exports. This is the only module with `unsafe` code; each
//! block says why it is sound.
#![allow(unsafe_code)]

use alloc::vec::Vec;
use core::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::__rt::{Procedure, decode, encode};
use crate::{Abort, KeySet, Tx, abi};

#[link(wasm_import_module = "transdb_v1")]
unsafe extern "C" {
    fn get(key_ptr: *const u8, key_len: usize, out_ptr: *mut u8, out_cap: usize) -> i64;
    fn put(key_ptr: *const u8, key_len: usize, value_ptr: *const u8, value_len: usize);
    fn delete(key_ptr: *const u8, key_len: usize) -> i32;
    fn output(ptr: *const u8, len: usize);
    #[link_name = "fail"]
    fn host_fail(kind: i32, ptr: *const u8, len: usize) -> !;
    #[link_name = "log"]
    fn host_log(level: i32, ptr: *const u8, len: usize);
    fn declare_key(key_ptr: *const u8, key_len: usize, write: i32);
}

/// First guess for a value's size; a larger value costs a second `get`.
const FIRST_READ_BYTES: usize = 64;

pub(crate) struct TxBackend<'a> {
    _call: PhantomData<&'a mut ()>,
}

impl TxBackend<'_> {
    pub(crate) fn get(&mut self, key: &str) -> Option<Vec<u8>> {
        let mut buffer: Vec<u8> = Vec::with_capacity(FIRST_READ_BYTES);
        loop {
            // SAFETY: the key is a live str; the host writes at most `capacity` bytes into the
            // buffer's spare capacity and returns the value's full length.
            let length = unsafe {
                get(
                    key.as_ptr(),
                    key.len(),
                    buffer.as_mut_ptr(),
                    buffer.capacity(),
                )
            };
            if length == abi::GET_ABSENT {
                return None;
            }
            let length = length as usize;
            if length <= buffer.capacity() {
                // SAFETY: the host initialised `length` bytes (at most the capacity).
                unsafe { buffer.set_len(length) };
                return Some(buffer);
            }
            buffer.reserve_exact(length);
        }
    }

    pub(crate) fn put(&mut self, key: &str, value: &[u8]) {
        // SAFETY: both slices are live for the call; the host only reads them.
        unsafe { put(key.as_ptr(), key.len(), value.as_ptr(), value.len()) }
    }

    pub(crate) fn delete(&mut self, key: &str) -> bool {
        // SAFETY: the key is live for the call; the host only reads it.
        unsafe { delete(key.as_ptr(), key.len()) == 1 }
    }
}

pub(crate) fn fail(kind: i32, message: &str) -> ! {
    // SAFETY: the message is live for the call; the host reads it and ends the call.
    unsafe { host_fail(kind, message.as_ptr(), message.len()) }
}

pub(crate) fn log(level: i32, message: &str) {
    // SAFETY: the message is live for the call; the host only reads it.
    unsafe { host_log(level, message.as_ptr(), message.len()) }
}

fn arguments<'a>(args_ptr: i32, args_len: i32) -> &'a [u8] {
    // SAFETY: the host placed `args_len` bytes at `args_ptr`, in memory it obtained from
    // `transdb_alloc`, and nothing frees it during the call.
    unsafe { core::slice::from_raw_parts(args_ptr as usize as *const u8, args_len as usize) }
}

/// Entry point of a procedure export.
pub fn run_procedure<A: DeserializeOwned, R: Serialize>(
    args_ptr: i32,
    args_len: i32,
    format: i32,
    procedure: Procedure<A, R>,
) {
    let args: A = decode(format, arguments(args_ptr, args_len));
    let mut tx = Tx {
        backend: TxBackend { _call: PhantomData },
    };
    match procedure(&mut tx, args) {
        Ok(result) => {
            let bytes = encode(format, &result);
            // SAFETY: the bytes are live for the call; the host copies them.
            unsafe { output(bytes.as_ptr(), bytes.len()) }
        }
        Err(Abort { message }) => fail(abi::fail::ABORT, &message),
    }
}

/// Entry point of a key-set export.
pub fn run_keys<A: DeserializeOwned>(
    args_ptr: i32,
    args_len: i32,
    format: i32,
    keys: fn(&A, &mut KeySet),
) {
    let args: A = decode(format, arguments(args_ptr, args_len));
    let mut set = KeySet::default();
    keys(&args, &mut set);
    for (key, write) in set.iter() {
        // SAFETY: the key is live for the call; the host only reads it.
        unsafe { declare_key(key.as_ptr(), key.len(), i32::from(write)) }
    }
}

/// The export the host calls to place a call's arguments in guest memory.
#[unsafe(export_name = "transdb_alloc")]
extern "C" fn transdb_alloc(len: i32) -> i32 {
    let mut buffer: Vec<u8> = Vec::with_capacity(len.max(0) as usize);
    let pointer = buffer.as_mut_ptr();
    core::mem::forget(buffer); // owned by the call, which is the instance's whole life
    pointer as usize as i32
}

#[cfg(feature = "allocator")]
mod allocator {
    use core::alloc::{GlobalAlloc, Layout};
    use core::sync::atomic::{AtomicUsize, Ordering};

    const PAGE_BYTES: usize = 65_536;

    /// A bump allocator: every call runs in a fresh instance, so memory is returned by
    /// discarding the instance. Only the most recent allocation is freed or grown in place.
    struct Bump {
        next: AtomicUsize,
    }

    unsafe extern "C" {
        static __heap_base: u8;
    }

    #[global_allocator]
    static ALLOCATOR: Bump = Bump {
        next: AtomicUsize::new(0),
    };

    impl Bump {
        fn start(&self) -> usize {
            match self.next.load(Ordering::Relaxed) {
                // Only the linker symbol's address is taken.
                0 => core::ptr::addr_of!(__heap_base) as usize,
                next => next,
            }
        }
    }

    // SAFETY: single-threaded wasm; returns null when memory cannot grow.
    unsafe impl GlobalAlloc for Bump {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let start = (self.start() + layout.align() - 1) & !(layout.align() - 1);
            let Some(end) = start.checked_add(layout.size()) else {
                return core::ptr::null_mut();
            };
            let memory_end = core::arch::wasm32::memory_size(0) * PAGE_BYTES;
            if end > memory_end {
                let pages = (end - memory_end).div_ceil(PAGE_BYTES);
                if core::arch::wasm32::memory_grow(0, pages) == usize::MAX {
                    return core::ptr::null_mut();
                }
            }
            self.next.store(end, Ordering::Relaxed);
            start as *mut u8
        }

        unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
            if pointer as usize + layout.size() == self.next.load(Ordering::Relaxed) {
                self.next.store(pointer as usize, Ordering::Relaxed);
            }
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    /// Formats without allocating: the panic may be an allocation failure.
    struct Buffer {
        bytes: [u8; 512],
        len: usize,
    }
    impl Write for Buffer {
        fn write_str(&mut self, text: &str) -> core::fmt::Result {
            let take = text.len().min(self.bytes.len() - self.len);
            self.bytes[self.len..self.len + take].copy_from_slice(&text.as_bytes()[..take]);
            self.len += take;
            Ok(())
        }
    }
    let mut buffer = Buffer {
        bytes: [0; 512],
        len: 0,
    };
    let _ = write!(buffer, "{}", info.message());
    if let Some(location) = info.location() {
        let _ = write!(buffer, " (at {}:{})", location.file(), location.line());
    }
    let mut end = buffer.len;
    while core::str::from_utf8(&buffer.bytes[..end]).is_err() {
        end -= 1; // a cut in the middle of a character
    }
    let message = core::str::from_utf8(&buffer.bytes[..end]).unwrap_or("panic");
    fail(abi::fail::PANIC, message)
}
