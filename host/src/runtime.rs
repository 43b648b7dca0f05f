//! The WebAssembly runtime: compiles modules at deploy, runs procedure calls.
//!
//! Contract:
//! - **Compile once, fresh instance per call.** A module is validated and compiled when it
//!   is deployed ([`Runtime::compile`]); every call instantiates it anew from its
//!   `InstancePre`, in a slot of wasmtime's pooling allocator (copy-on-write memory
//!   images, no `mmap` per call). Nothing an earlier call left in an instance can change a
//!   later call's outcome, so replays and replicas agree whatever the module does.
//! - **Deterministic limits decide outcomes.** Fuel is the CPU limit (out of fuel is a
//!   deterministic `OUT_OF_FUEL`); memory, wasm stack, table size, output size and keys per
//!   call are bounded by [`RuntimeLimits`]. An epoch deadline is only a backstop against a
//!   runaway host and reports `DEADLINE_EXCEEDED`.
//! - **No ambient authority.** A guest sees only the `transdb_v1` imports (`ABI.md`): no
//!   WASI, clock or randomness; NaNs are canonicalised; relaxed SIMD is deterministic.
//! - **All or nothing.** A call's writes go to a [`Transaction`] that is committed only when
//!   the procedure returns a result; any failure drops it.
//! - **Two halves.** [`Runtime::prepare`] instantiates and runs the key function without
//!   locks; the caller then acquires the key set's locks from the scheduler and runs
//!   [`PreparedCall::execute`]. Waiting for locks never holds a thread.
//!
//! Every host function checks its arguments (pointer ranges against the guest memory, UTF-8,
//! limits, the phase it may be called in) and fails the call with a precise code instead of
//! trusting the guest.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use transdb_proto::abi::{self, import};
use transdb_proto::message::Encoding;
use transdb_proto::{ErrorCode, ErrorResponse};
use wasmtime::{
    Caller, Config, Engine, Extern, ExternType, Instance, InstanceAllocationStrategy, InstancePre,
    Linker, Memory, Module, ModuleExport, PoolConcurrencyLimitError, PoolingAllocationConfig,
    Store as WasmStore, Trap, TypedFunc, ValType,
};

use crate::lock_manager::{LockSet, Position};
use crate::store::Store;
use crate::transaction::{DeclaredKeys, Transaction, lock_set, too_many_keys};

/// Limits on what one call may use. Each is named, has a default, and is a `serve` flag.
#[derive(Clone, Debug)]
pub struct RuntimeLimits {
    /// Fuel per call (roughly one unit per wasm instruction): the deterministic CPU limit.
    pub fuel_per_call: u64,
    /// Linear memory per instance, in bytes.
    pub memory_bytes: usize,
    /// Native stack for wasm frames, in bytes.
    pub wasm_stack_bytes: usize,
    /// Elements per table.
    pub table_elements: usize,
    /// Result size, in bytes.
    pub output_bytes: usize,
    /// Distinct keys one call may declare or touch.
    pub keys_per_call: usize,
    /// Size of a module, in bytes.
    pub module_bytes: usize,
    /// Calls running at once (instance slots of the pooling allocator).
    pub concurrent_calls: u32,
    /// Wall-clock backstop per call.
    pub deadline: Duration,
    /// Log lines one call may write (more are dropped, with one warning).
    pub log_lines_per_call: usize,
}

/// Default fuel: about 10 million wasm instructions, tens of milliseconds at most.
pub const DEFAULT_FUEL_PER_CALL: u64 = 10_000_000;
/// Default memory per instance.
pub const DEFAULT_MEMORY_BYTES: usize = 16 * 1024 * 1024;
/// Default wasm stack.
pub const DEFAULT_WASM_STACK_BYTES: usize = 512 * 1024;
/// Default table size.
pub const DEFAULT_TABLE_ELEMENTS: usize = 10_000;
/// Default result size.
pub const DEFAULT_OUTPUT_BYTES: usize = 1024 * 1024;
/// Default keys per call.
pub const DEFAULT_KEYS_PER_CALL: usize = 10_000;
/// Default module size: the largest that fits in one request frame.
pub const DEFAULT_MODULE_BYTES: usize = transdb_proto::limits::MAX_VALUE_BYTES;
/// Default number of calls running at once. Calls run on the server's worker threads (one
/// per core) and deploys' trial instantiations; each slot reserves address space (not
/// memory) for one linear memory.
pub const DEFAULT_CONCURRENT_CALLS: u32 = 32;
/// Default backstop.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);
/// Default log lines per call.
pub const DEFAULT_LOG_LINES_PER_CALL: usize = 64;

/// Longest log line or failure message kept from a guest.
const MAX_GUEST_MESSAGE_BYTES: usize = 4096;
/// Memory kept mapped in a reused instance slot and reset with memset. Modules built with
/// `scripts/build-procedures` (64 KiB stack) fit; memory beyond this is returned with
/// madvise, which is correct but slower.
const KEEP_RESIDENT_BYTES: usize = 256 * 1024;
/// How often the epoch (the backstop's clock) advances.
const EPOCH_TICK: Duration = Duration::from_millis(10);

impl Default for RuntimeLimits {
    fn default() -> Self {
        Self {
            fuel_per_call: DEFAULT_FUEL_PER_CALL,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            wasm_stack_bytes: DEFAULT_WASM_STACK_BYTES,
            table_elements: DEFAULT_TABLE_ELEMENTS,
            output_bytes: DEFAULT_OUTPUT_BYTES,
            keys_per_call: DEFAULT_KEYS_PER_CALL,
            module_bytes: DEFAULT_MODULE_BYTES,
            concurrent_calls: DEFAULT_CONCURRENT_CALLS,
            deadline: DEFAULT_DEADLINE,
            log_lines_per_call: DEFAULT_LOG_LINES_PER_CALL,
        }
    }
}

/// A procedure a module exports.
#[derive(Clone)]
pub struct ProcedureExport {
    /// Whether the module also exports a key function for it.
    pub declares_keys: bool,
    /// The procedure export, resolved at deploy (no lookup by name per call).
    run: ModuleExport,
    /// The key function export.
    keys: Option<ModuleExport>,
}

/// A validated, compiled module, ready to instantiate.
pub struct CompiledModule {
    instance_pre: InstancePre<CallState>,
    memory: ModuleExport,
    alloc: ModuleExport,
    /// Procedures by name.
    pub procedures: BTreeMap<String, ProcedureExport>,
}

fn encoding_abi(encoding: Encoding) -> i32 {
    match encoding {
        Encoding::Postcard => abi::format::POSTCARD,
        Encoding::Json => abi::format::JSON,
    }
}

/// The state of one call, reachable from host functions.
pub struct CallState {
    module: Arc<str>,
    procedure: String,
    memory: Option<Memory>,
    /// Set while the key function runs.
    declaring: Option<DeclaredKeys>,
    /// Set while the procedure runs.
    transaction: Option<Transaction>,
    output: Option<Vec<u8>>,
    failure: Option<ErrorResponse>,
    log_lines: usize,
    limits: Arc<RuntimeLimits>,
}

/// The runtime: one engine, one linker of host functions, the epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<CallState>,
    limits: Arc<RuntimeLimits>,
    ticker: Option<JoinHandle<()>>,
    ticker_stop: Arc<AtomicBool>,
}

impl Runtime {
    /// A runtime enforcing `limits`.
    pub fn new(limits: RuntimeLimits) -> anyhow::Result<Runtime> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(limits.concurrent_calls)
            .total_memories(limits.concurrent_calls)
            .total_tables(limits.concurrent_calls)
            .max_memory_size(limits.memory_bytes)
            .table_elements(limits.table_elements)
            .max_memories_per_module(1)
            .max_tables_per_module(1)
            // A call's instance is reset when its slot is reused. Resetting with memset
            // changes no page tables; madvise + copy-on-write refaults would cost a TLB
            // shootdown (an IPI to every core) per page per call.
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .table_keep_resident(KEEP_RESIDENT_BYTES);
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .epoch_interruption(true)
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            .max_wasm_stack(limits.wasm_stack_bytes)
            // See KEEP_RESIDENT_BYTES: data segments are copied in, not mapped copy-on-write.
            .memory_init_cow(false)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine =
            Engine::new(&config).map_err(|error| anyhow::anyhow!("wasm engine: {error}"))?;
        let mut linker = Linker::new(&engine);
        define_host_functions(&mut linker)
            .map_err(|error| anyhow::anyhow!("host functions: {error}"))?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            std::thread::Builder::new()
                .name("transdb-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })?
        };
        Ok(Runtime {
            engine,
            linker,
            limits: Arc::new(limits),
            ticker: Some(ticker),
            ticker_stop,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &RuntimeLimits {
        &self.limits
    }

    /// Validates and compiles a module: size, wasm validity, imports (only `transdb_v1`
    /// functions with the right types), exports (memory, allocator, procedures), and a
    /// trial instantiation within the limits.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledModule, ErrorResponse> {
        if bytes.len() > self.limits.module_bytes {
            return Err(ErrorResponse::new(
                ErrorCode::MODULE_TOO_LARGE,
                format!(
                    "the module is {} bytes; the limit (--max-module-bytes) is {}",
                    bytes.len(),
                    self.limits.module_bytes
                ),
            ));
        }
        let invalid = |message: String| ErrorResponse::new(ErrorCode::INVALID_MODULE, message);
        if !bytes.starts_with(b"\0asm") {
            return Err(invalid("not a WebAssembly module (it does not start with \\0asm): deploy the .wasm file built by scripts/build-procedures".into()));
        }
        let module = Module::new(&self.engine, bytes).map_err(|error| {
            invalid(format!(
                "the module is not valid WebAssembly or does not fit the limits: {error:#}"
            ))
        })?;
        check_imports(&module).map_err(invalid)?;
        let resolve = |name: String| {
            module
                .get_export_index(&name)
                .expect("checked by check_exports")
        };
        let procedures = check_exports(&module)
            .map_err(invalid)?
            .into_iter()
            .map(|(name, declares_keys)| {
                let run = resolve(format!("{}{name}", abi::EXPORT_PROCEDURE_PREFIX));
                let keys =
                    declares_keys.then(|| resolve(format!("{}{name}", abi::EXPORT_KEYS_PREFIX)));
                (
                    name,
                    ProcedureExport {
                        declares_keys,
                        run,
                        keys,
                    },
                )
            })
            .collect();
        let memory = module
            .get_export_index(abi::EXPORT_MEMORY)
            .expect("checked by check_exports");
        let alloc = module
            .get_export_index(abi::EXPORT_ALLOC)
            .expect("checked by check_exports");
        let instance_pre = self.linker.instantiate_pre(&module).map_err(|error| {
            invalid(format!(
                "imports do not match the host functions of ABI.md: {error:#}"
            ))
        })?;
        let compiled = CompiledModule {
            instance_pre,
            memory,
            alloc,
            procedures,
        };
        // A trial instantiation catches memories and tables over the limits, and a start
        // function that fails, now rather than at the first call.
        let mut store = self.new_store(Arc::from("(deploy)"), String::new());
        compiled
            .instance_pre
            .instantiate(&mut store)
            .map_err(|error| {
                invalid(format!(
                    "the module cannot be instantiated within the limits: {}",
                    describe_trap(&error)
                ))
            })?;
        Ok(compiled)
    }

    fn new_store(&self, module: Arc<str>, procedure: String) -> WasmStore<CallState> {
        let state = CallState {
            module,
            procedure,
            memory: None,
            declaring: None,
            transaction: None,
            output: None,
            failure: None,
            log_lines: 0,
            limits: self.limits.clone(),
        };
        let mut store = WasmStore::new(&self.engine, state);
        store
            .set_fuel(self.limits.fuel_per_call)
            .expect("fuel is enabled");
        let ticks = (self.limits.deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store
    }

    /// First half of a call: instantiates the module and runs the procedure's key function
    /// (if any). Holds no lock; the caller acquires [`PreparedCall::lock_set`] and then
    /// calls [`PreparedCall::execute`].
    pub fn prepare(
        &self,
        module_name: &Arc<str>,
        module: &CompiledModule,
        procedure: &str,
        encoding: Encoding,
        args: &[u8],
        store: &Arc<Store>,
    ) -> Result<PreparedCall, ErrorResponse> {
        self.prepare_with(module_name, module, procedure, encoding, args, store, None)
    }

    /// [`Runtime::prepare`], with the key set `given` instead of a reconnaissance run when
    /// it is `Some` (replaying a logged call whose keys were reconnoitred: the call then
    /// counts as reconnoitred, so touching another key aborts it as it did when it ran).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_with(
        &self,
        module_name: &Arc<str>,
        module: &CompiledModule,
        procedure: &str,
        encoding: Encoding,
        args: &[u8],
        store: &Arc<Store>,
        given: Option<DeclaredKeys>,
    ) -> Result<PreparedCall, ErrorResponse> {
        let Some(export) = module.procedures.get(procedure) else {
            return Err(ErrorResponse::new(
                ErrorCode::PROCEDURE_NOT_FOUND,
                format!(
                    "module {module_name:?} has no procedure {procedure:?}; it has: {}",
                    module
                        .procedures
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        // Without a key function: a reconnaissance run in a throwaway instance discovers the
        // keys the procedure touches in the current state (OLLP).
        let run_keys = given.is_none();
        let discovered = match (given, &export.keys) {
            (Some(given), _) => Some(given),
            (None, Some(_)) => None,
            (None, None) => Some(self.reconnoitre(
                module_name,
                module,
                procedure,
                export,
                encoding,
                args,
                store,
            )?),
        };
        let mut wasm = self.new_store(module_name.clone(), procedure.to_owned());
        match instantiate_and_declare(&mut wasm, module, export, encoding, args, run_keys) {
            Ok((instance, alloc, memory)) => {
                let reconnoitred = discovered.is_some();
                let declared = discovered.or_else(|| wasm.data_mut().declaring.take());
                Ok(PreparedCall {
                    wasm,
                    instance,
                    alloc,
                    memory,
                    run: export.run,
                    encoding,
                    declared,
                    reconnoitred,
                    keys_per_call: self.limits.keys_per_call,
                    fuel_per_call: self.limits.fuel_per_call,
                })
            }
            Err(error) => Err(wasm
                .data_mut()
                .failure
                .take()
                .unwrap_or_else(|| classify(&error))),
        }
    }
}

impl Runtime {
    /// Runs the procedure once without locks against the current state, writes discarded,
    /// and returns the keys it touched. Whatever the run's outcome, the keys it reached are
    /// the best guess and the real run, under locks, decides the outcome — except past the
    /// key limit, which fails the call with `TOO_MANY_KEYS` at once.
    #[allow(clippy::too_many_arguments)]
    fn reconnoitre(
        &self,
        module_name: &Arc<str>,
        module: &CompiledModule,
        procedure: &str,
        export: &ProcedureExport,
        encoding: Encoding,
        args: &[u8],
        store: &Arc<Store>,
    ) -> Result<DeclaredKeys, ErrorResponse> {
        let mut wasm = self.new_store(module_name.clone(), procedure.to_owned());
        wasm.data_mut().transaction = Some(Transaction::begin(
            store.clone(),
            None,
            self.limits.keys_per_call,
        ));
        let reconnaissance = PreparedCall::run_in;
        if let Ok((instance, alloc, memory)) =
            instantiate_and_declare(&mut wasm, module, export, encoding, args, true)
        {
            let _ = reconnaissance(
                &mut wasm,
                &instance,
                &alloc,
                memory,
                &export.run,
                encoding,
                args,
            );
        }
        // Past the key limit the discovered set is cut short, so the real run would stray
        // outside it on every attempt: report the limit now instead.
        if let Some(failure) = wasm.data_mut().failure.take()
            && failure.code == ErrorCode::TOO_MANY_KEYS
        {
            return Err(failure);
        }
        Ok(wasm
            .data()
            .transaction
            .as_ref()
            .map(Transaction::discovered_keys)
            .unwrap_or_default())
    }
}

/// A call between its two halves: instantiated, key set known, no lock held.
pub struct PreparedCall {
    wasm: WasmStore<CallState>,
    instance: Instance,
    alloc: TypedFunc<i32, i32>,
    memory: Memory,
    run: ModuleExport,
    encoding: Encoding,
    declared: Option<DeclaredKeys>,
    /// Whether the key set came from a reconnaissance run (so a `KEY_NOT_DECLARED` means
    /// the state moved and the call may be prepared again).
    reconnoitred: bool,
    keys_per_call: usize,
    /// The fuel the call started with (its store's fuel is what is left).
    fuel_per_call: u64,
}

impl PreparedCall {
    /// The locks the call needs: its declared or discovered keys.
    pub fn lock_set(&self) -> LockSet {
        lock_set(self.declared.as_ref())
    }

    /// Whether the key set was discovered by a reconnaissance run rather than declared.
    pub fn reconnoitred(&self) -> bool {
        self.reconnoitred
    }

    /// The keys the call may touch (`true`: written), if it declared or discovered them
    /// (`None`: it may touch any key).
    pub fn declared_keys(&self) -> Option<&DeclaredKeys> {
        self.declared.as_ref()
    }

    /// Second half of a call, with the locks of [`PreparedCall::lock_set`] held: runs the
    /// procedure as one transaction on `store` and returns its result; commits only if
    /// the procedure produced one.
    pub fn execute(
        self,
        store: &Arc<Store>,
        args: &[u8],
        position: Position,
    ) -> Result<Vec<u8>, ErrorResponse> {
        self.execute_metered(store, args, position).0
    }

    /// [`PreparedCall::execute`], also returning the fuel the call used (its key function's
    /// and its run's).
    pub fn execute_metered(
        mut self,
        store: &Arc<Store>,
        args: &[u8],
        position: Position,
    ) -> (Result<Vec<u8>, ErrorResponse>, u64) {
        let transaction =
            Transaction::begin(store.clone(), self.declared.take(), self.keys_per_call);
        self.wasm.data_mut().transaction = Some(transaction);
        let outcome = self.run(args);
        let fuel = self
            .fuel_per_call
            .saturating_sub(self.wasm.get_fuel().unwrap_or(0));
        (self.finish(outcome, position), fuel)
    }

    fn finish(
        &mut self,
        outcome: wasmtime::Result<()>,
        position: Position,
    ) -> Result<Vec<u8>, ErrorResponse> {
        let state = self.wasm.data_mut();
        match outcome {
            Ok(()) => {
                let output = state.output.take().ok_or_else(|| {
                    ErrorResponse::new(
                        ErrorCode::ABI_VIOLATION,
                        "the procedure returned without calling output",
                    )
                })?;
                state
                    .transaction
                    .take()
                    .expect("set before the procedure ran")
                    .commit(position)?;
                Ok(output)
            }
            Err(error) => Err(state.failure.take().unwrap_or_else(|| classify(&error))),
        }
    }

    fn run(&mut self, args: &[u8]) -> wasmtime::Result<()> {
        Self::run_in(
            &mut self.wasm,
            &self.instance,
            &self.alloc,
            self.memory,
            &self.run,
            self.encoding,
            args,
        )
    }

    fn run_in(
        wasm: &mut WasmStore<CallState>,
        instance: &Instance,
        alloc: &TypedFunc<i32, i32>,
        memory: Memory,
        export: &ModuleExport,
        encoding: Encoding,
        args: &[u8],
    ) -> wasmtime::Result<()> {
        let run = instance
            .get_module_export(&mut *wasm, export)
            .and_then(Extern::into_func)
            .expect("checked at deploy")
            .typed::<(i32, i32, i32), ()>(&*wasm)?;
        let (pointer, length) = place_args(wasm, alloc, memory, args)?;
        run.call(&mut *wasm, (pointer, length, encoding_abi(encoding)))
    }
}

/// Copies `args` into guest memory obtained from `transdb_alloc`.
fn place_args(
    wasm: &mut WasmStore<CallState>,
    alloc: &TypedFunc<i32, i32>,
    memory: Memory,
    args: &[u8],
) -> wasmtime::Result<(i32, i32)> {
    let length =
        i32::try_from(args.len()).map_err(|_| wasmtime::Error::msg("arguments too large"))?;
    let pointer = alloc.call(&mut *wasm, length)?;
    memory
        .write(&mut *wasm, pointer as u32 as usize, args)
        .map_err(|_| {
            fail(
                wasm.data_mut(),
                ErrorCode::ABI_VIOLATION,
                "transdb_alloc returned memory outside the guest's memory".into(),
            )
        })?;
    Ok((pointer, length))
}

/// Instantiates `module` and, if the procedure has one, runs its key function, leaving the
/// declared keys in the call state.
fn instantiate_and_declare(
    wasm: &mut WasmStore<CallState>,
    module: &CompiledModule,
    export: &ProcedureExport,
    encoding: Encoding,
    args: &[u8],
    run_keys: bool,
) -> wasmtime::Result<(Instance, TypedFunc<i32, i32>, Memory)> {
    let instance = module.instance_pre.instantiate(&mut *wasm)?;
    let memory = instance
        .get_module_export(&mut *wasm, &module.memory)
        .and_then(Extern::into_memory)
        .expect("checked at deploy");
    wasm.data_mut().memory = Some(memory);
    let alloc = instance
        .get_module_export(&mut *wasm, &module.alloc)
        .and_then(Extern::into_func)
        .expect("checked at deploy")
        .typed::<i32, i32>(&*wasm)?;
    if let Some(keys) = export.keys.as_ref().filter(|_| run_keys) {
        let keys = instance
            .get_module_export(&mut *wasm, keys)
            .and_then(Extern::into_func)
            .expect("checked at deploy")
            .typed::<(i32, i32, i32), ()>(&*wasm)?;
        let (pointer, length) = place_args(wasm, &alloc, memory, args)?;
        wasm.data_mut().declaring = Some(DeclaredKeys::new());
        keys.call(&mut *wasm, (pointer, length, encoding_abi(encoding)))?;
    }
    Ok((instance, alloc, memory))
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
    }
}

fn check_imports(module: &Module) -> Result<(), String> {
    for import in module.imports() {
        let (module_name, name) = (import.module(), import.name());
        if module_name != abi::IMPORT_MODULE {
            return Err(if module_name.starts_with(abi::IMPORT_MODULE_PREFIX) {
                format!(
                    "the module was built for ABI {module_name} (it imports {module_name}.{name}); this server provides {}: rebuild it against a matching transdb-guest",
                    abi::IMPORT_MODULE
                )
            } else if module_name.starts_with("wasi") {
                format!(
                    "the module imports {module_name}.{name}: WASI is not available to procedures (no files, clocks or randomness); build for wasm32-unknown-unknown with transdb-guest"
                )
            } else {
                format!(
                    "the module imports {module_name}.{name}; only {} functions exist (see ABI.md)",
                    abi::IMPORT_MODULE
                )
            });
        }
        if !matches!(import.ty(), ExternType::Func(_)) {
            return Err(format!(
                "the module imports {module_name}.{name} as a non-function; the host provides only functions"
            ));
        }
        let known = [
            import::GET,
            import::PUT,
            import::DELETE,
            import::OUTPUT,
            import::FAIL,
            import::LOG,
            import::DECLARE_KEY,
        ];
        if !known.contains(&name) {
            return Err(format!(
                "the module imports {module_name}.{name}, which this server does not provide (see ABI.md)"
            ));
        }
    }
    Ok(())
}

/// The procedures a module exports, each with whether it has a key function.
fn check_exports(module: &Module) -> Result<BTreeMap<String, bool>, String> {
    let i32_params = |function: &wasmtime::FuncType, count: usize| {
        function.params().len() == count
            && function.params().all(|param| matches!(param, ValType::I32))
    };
    match module.get_export(abi::EXPORT_MEMORY) {
        Some(ExternType::Memory(memory)) if !memory.is_64() && !memory.is_shared() => {}
        _ => return Err("the module does not export a 32-bit memory named `memory`".into()),
    }
    match module.get_export(abi::EXPORT_ALLOC) {
        Some(ExternType::Func(function))
            if i32_params(&function, 1)
                && function.results().len() == 1
                && matches!(function.results().next(), Some(ValType::I32)) => {}
        _ => {
            return Err(format!(
                "the module does not export `{}: (i32) -> i32` (transdb-guest provides it)",
                abi::EXPORT_ALLOC
            ));
        }
    }
    let mut procedures = BTreeMap::new();
    let mut keys = Vec::new();
    for export in module.exports() {
        let (name, kind) =
            if let Some(name) = export.name().strip_prefix(abi::EXPORT_PROCEDURE_PREFIX) {
                (name, "procedure")
            } else if let Some(name) = export.name().strip_prefix(abi::EXPORT_KEYS_PREFIX) {
                (name, "key function")
            } else {
                continue;
            };
        if !abi::is_valid_name(name, false) {
            return Err(format!(
                "{kind} export {:?}: {name:?} is not a valid procedure name",
                export.name()
            ));
        }
        match export.ty() {
            ExternType::Func(function)
                if i32_params(&function, 3) && function.results().len() == 0 => {}
            _ => {
                return Err(format!(
                    "{kind} export {:?} must be a function (i32, i32, i32) -> ()",
                    export.name()
                ));
            }
        }
        if kind == "procedure" {
            procedures.insert(name.to_owned(), false);
        } else {
            keys.push(name.to_owned());
        }
    }
    for name in keys {
        match procedures.get_mut(&name) {
            Some(declares_keys) => *declares_keys = true,
            None => {
                return Err(format!(
                    "key function {name:?} has no procedure of the same name"
                ));
            }
        }
    }
    if procedures.is_empty() {
        return Err(format!(
            "the module exports no procedures (functions named {}<name>): declare them with transdb_guest::procedure!",
            abi::EXPORT_PROCEDURE_PREFIX
        ));
    }
    Ok(procedures)
}

/// The error of a call that trapped without recording a failure of its own.
fn classify(error: &wasmtime::Error) -> ErrorResponse {
    if error.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
        return ErrorResponse::new(
            ErrorCode::OVERLOADED,
            format!(
                "every procedure-call slot is in use (--max-concurrent-calls): retry shortly ({error})"
            ),
        );
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => ErrorResponse::new(
            ErrorCode::OUT_OF_FUEL,
            "the procedure ran out of fuel (its CPU limit, --fuel-per-call)",
        ),
        Some(Trap::Interrupt) => ErrorResponse::new(
            ErrorCode::DEADLINE_EXCEEDED,
            "the call exceeded the server's wall-clock backstop (--call-deadline-ms) before running out of fuel",
        ),
        Some(Trap::StackOverflow) => ErrorResponse::new(
            ErrorCode::GUEST_TRAP,
            "the procedure overflowed its stack (--wasm-stack-bytes)",
        ),
        Some(trap) => ErrorResponse::new(
            ErrorCode::GUEST_TRAP,
            format!("the procedure trapped: {trap}"),
        ),
        None => ErrorResponse::new(
            ErrorCode::GUEST_TRAP,
            format!("the procedure failed: {}", describe_trap(error)),
        ),
    }
}

fn describe_trap(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{error:#}"),
    }
}

/// Records `message` as the call's failure and returns the trap that ends the call.
fn fail(state: &mut CallState, code: ErrorCode, message: String) -> wasmtime::Error {
    let error = wasmtime::Error::msg(message.clone());
    state
        .failure
        .get_or_insert(ErrorResponse::new(code, message));
    error
}

/// The guest memory range `[pointer, pointer + length)`, checked.
fn guest_range(data: &[u8], pointer: i32, length: i32) -> Option<Range<usize>> {
    let start = pointer as u32 as usize;
    let end = start.checked_add(length as u32 as usize)?;
    (end <= data.len()).then_some(start..end)
}

fn guest_bytes<'a>(
    data: &'a [u8],
    pointer: i32,
    length: i32,
    what: &str,
) -> Result<&'a [u8], String> {
    guest_range(data, pointer, length)
        .map(|range| &data[range])
        .ok_or_else(|| {
            format!("{what} ({length} bytes at {pointer:#x}) lies outside the guest's memory")
        })
}

fn guest_str<'a>(data: &'a [u8], pointer: i32, length: i32, what: &str) -> Result<&'a str, String> {
    std::str::from_utf8(guest_bytes(data, pointer, length, what)?)
        .map_err(|_| format!("{what} is not UTF-8"))
}

/// Text from the guest for a log line or failure message: lossy, bounded.
fn guest_message(data: &[u8], pointer: i32, length: i32) -> Result<String, String> {
    let bytes = guest_bytes(data, pointer, length, "message")?;
    let mut text =
        String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_GUEST_MESSAGE_BYTES)]).into_owned();
    if bytes.len() > MAX_GUEST_MESSAGE_BYTES {
        text.push_str(" […]");
    }
    Ok(text)
}

/// The guest's memory and the call state, or the trap for a call made before the memory
/// is known (a start function calling the host).
fn parts<'a>(
    caller: &'a mut Caller<'_, CallState>,
) -> Result<(&'a mut [u8], &'a mut CallState), wasmtime::Error> {
    match caller.data().memory {
        Some(memory) => Ok(memory.data_and_store_mut(caller)),
        None => Err(fail(
            caller.data_mut(),
            ErrorCode::ABI_VIOLATION,
            "host functions cannot be called from a start function".into(),
        )),
    }
}

fn transaction<'a>(
    state: &'a mut CallState,
    function: &str,
) -> Result<&'a mut Transaction, wasmtime::Error> {
    if state.transaction.is_none() {
        let message = format!(
            "{function} is not available in a key function (key functions see only their arguments)"
        );
        return Err(fail(state, ErrorCode::ABI_VIOLATION, message));
    }
    Ok(state.transaction.as_mut().expect("checked"))
}

fn define_host_functions(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    let module = abi::IMPORT_MODULE;
    linker.func_wrap(
        module,
        import::GET,
        |mut caller: Caller<'_, CallState>,
         key_pointer: i32,
         key_length: i32,
         out_pointer: i32,
         out_capacity: i32|
         -> wasmtime::Result<i64> {
            let (data, state) = parts(&mut caller)?;
            let key = guest_str(data, key_pointer, key_length, "key")
                .map_err(|message| fail(state, ErrorCode::ABI_VIOLATION, message))?;
            let value = match transaction(state, "get")?.get(key) {
                Ok(value) => value,
                Err(error) => return Err(fail(state, error.code, error.message)),
            };
            let Some(value) = value else {
                return Ok(abi::GET_ABSENT);
            };
            if value.len() <= out_capacity as u32 as usize {
                let Some(range) = guest_range(data, out_pointer, value.len() as i32) else {
                    return Err(fail(
                        state,
                        ErrorCode::ABI_VIOLATION,
                        "get's output buffer lies outside the guest's memory".into(),
                    ));
                };
                data[range].copy_from_slice(&value);
            }
            Ok(value.len() as i64)
        },
    )?;
    linker.func_wrap(
        module,
        import::PUT,
        |mut caller: Caller<'_, CallState>,
         key_pointer: i32,
         key_length: i32,
         value_pointer: i32,
         value_length: i32|
         -> wasmtime::Result<()> {
            let (data, state) = parts(&mut caller)?;
            let key = guest_str(data, key_pointer, key_length, "key")
                .map_err(|message| fail(state, ErrorCode::ABI_VIOLATION, message))?;
            let value = guest_bytes(data, value_pointer, value_length, "value")
                .map_err(|message| fail(state, ErrorCode::ABI_VIOLATION, message))?;
            match transaction(state, "put")?.put(key, value) {
                Ok(()) => Ok(()),
                Err(error) => Err(fail(state, error.code, error.message)),
            }
        },
    )?;
    linker.func_wrap(
        module,
        import::DELETE,
        |mut caller: Caller<'_, CallState>,
         key_pointer: i32,
         key_length: i32|
         -> wasmtime::Result<i32> {
            let (data, state) = parts(&mut caller)?;
            let key = guest_str(data, key_pointer, key_length, "key")
                .map_err(|message| fail(state, ErrorCode::ABI_VIOLATION, message))?;
            match transaction(state, "delete")?.delete(key) {
                Ok(existed) => Ok(i32::from(existed)),
                Err(error) => Err(fail(state, error.code, error.message)),
            }
        },
    )?;
    linker.func_wrap(
        module,
        import::OUTPUT,
        |mut caller: Caller<'_, CallState>, pointer: i32, length: i32| -> wasmtime::Result<()> {
            let (data, state) = parts(&mut caller)?;
            transaction(state, "output")?;
            let limit = state.limits.output_bytes;
            if length as u32 as usize > limit {
                let message = format!(
                    "the result is {} bytes; the limit (--max-output-bytes) is {limit}",
                    length as u32
                );
                return Err(fail(state, ErrorCode::OUTPUT_TOO_LARGE, message));
            }
            let bytes = guest_bytes(data, pointer, length, "output")
                .map_err(|message| fail(state, ErrorCode::ABI_VIOLATION, message))?;
            state.output = Some(bytes.to_vec());
            Ok(())
        },
    )?;
    linker.func_wrap(
        module,
        import::FAIL,
        |mut caller: Caller<'_, CallState>,
         kind: i32,
         pointer: i32,
         length: i32|
         -> wasmtime::Result<()> {
            let (data, state) = parts(&mut caller)?;
            let message = guest_message(data, pointer, length)
                .map_err(|message| fail(state, ErrorCode::ABI_VIOLATION, message))?;
            let code = match kind {
                abi::fail::ABORT => ErrorCode::ABORTED,
                abi::fail::PANIC => ErrorCode::GUEST_PANIC,
                abi::fail::INVALID_ARGUMENTS => ErrorCode::INVALID_ARGUMENTS,
                abi::fail::INVALID_VALUE => ErrorCode::INVALID_VALUE,
                abi::fail::INVALID_RESULT => ErrorCode::GUEST_PANIC,
                _ => {
                    return Err(fail(
                        state,
                        ErrorCode::ABI_VIOLATION,
                        format!("fail called with unknown kind {kind}: {message}"),
                    ));
                }
            };
            Err(fail(state, code, message))
        },
    )?;
    linker.func_wrap(
        module,
        import::LOG,
        |mut caller: Caller<'_, CallState>,
         level: i32,
         pointer: i32,
         length: i32|
         -> wasmtime::Result<()> {
            let (data, state) = parts(&mut caller)?;
            let message = guest_message(data, pointer, length)
                .map_err(|message| fail(state, ErrorCode::ABI_VIOLATION, message))?;
            state.log_lines += 1;
            let (module, procedure) = (&*state.module, state.procedure.as_str());
            if state.log_lines > state.limits.log_lines_per_call {
                if state.log_lines == state.limits.log_lines_per_call + 1 {
                    tracing::warn!(
                        module,
                        procedure,
                        "further log lines of this call dropped (limit {})",
                        state.limits.log_lines_per_call
                    );
                }
                return Ok(());
            }
            // `None` outside a served request (replay, in-process calls): the field is left out.
            let request_id = crate::network::current_request_id();
            match level {
                abi::level::ERROR => {
                    tracing::error!(target: "transdb::procedure", module, procedure, request_id, "{message}")
                }
                abi::level::WARN => {
                    tracing::warn!(target: "transdb::procedure", module, procedure, request_id, "{message}")
                }
                abi::level::DEBUG => {
                    tracing::debug!(target: "transdb::procedure", module, procedure, request_id, "{message}")
                }
                _ => tracing::info!(target: "transdb::procedure", module, procedure, request_id, "{message}"),
            }
            Ok(())
        },
    )?;
    linker.func_wrap(
        module,
        import::DECLARE_KEY,
        |mut caller: Caller<'_, CallState>,
         key_pointer: i32,
         key_length: i32,
         write: i32|
         -> wasmtime::Result<()> {
            let (data, state) = parts(&mut caller)?;
            let key = guest_str(data, key_pointer, key_length, "key")
                .map_err(|message| fail(state, ErrorCode::ABI_VIOLATION, message))?;
            if let Err(error) = transdb_proto::limits::check_key(key) {
                return Err(fail(state, error.code, error.message));
            }
            let limit = state.limits.keys_per_call;
            let Some(declaring) = state.declaring.as_mut() else {
                return Err(fail(
                    state,
                    ErrorCode::ABI_VIOLATION,
                    "declare_key may only be called from a key function".into(),
                ));
            };
            if !declaring.contains_key(key) && declaring.len() >= limit {
                let error = too_many_keys(limit);
                return Err(fail(state, error.code, error.message));
            }
            *declaring.entry(key.to_owned()).or_insert(false) |= write != 0;
            Ok(())
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole call without concurrency (no scheduler needed).
    fn call(
        runtime: &Runtime,
        module: &CompiledModule,
        procedure: &str,
        store: &Arc<Store>,
    ) -> Result<Vec<u8>, ErrorResponse> {
        runtime
            .prepare(
                &Arc::from("m"),
                module,
                procedure,
                Encoding::Json,
                b"",
                store,
            )?
            .execute(store, b"", 0)
    }

    #[test]
    fn the_deadline_is_a_backstop_when_fuel_would_allow_more() {
        let limits = RuntimeLimits {
            fuel_per_call: u64::MAX / 2,
            deadline: Duration::from_millis(50),
            ..RuntimeLimits::default()
        };
        let runtime = Runtime::new(limits).unwrap();
        let spin = wat::parse_str(
            r#"(module (memory (export "memory") 1)
                (func (export "transdb_alloc") (param i32) (result i32) (i32.const 0))
                (func (export "transdb_proc_spin") (param i32 i32 i32) (loop $forever (br $forever))))"#,
        )
        .unwrap();
        let module = runtime.compile(&spin).unwrap();
        let store = Arc::new(Store::new(1));
        let error = call(&runtime, &module, "spin", &store).unwrap_err();
        assert_eq!(error.code, ErrorCode::DEADLINE_EXCEEDED, "{error}");
    }

    #[test]
    fn a_reconnaissance_past_the_key_limit_reports_the_limit() {
        let runtime = Runtime::new(RuntimeLimits {
            keys_per_call: 3,
            ..RuntimeLimits::default()
        })
        .unwrap();
        // Writes keys "0", "1", "2", ... (one byte each) until something stops it.
        let many = wat::parse_str(
            r#"(module
                (import "transdb_v1" "put" (func $put (param i32 i32 i32 i32)))
                (memory (export "memory") 1)
                (func (export "transdb_alloc") (param i32) (result i32) (i32.const 1024))
                (func (export "transdb_proc_many") (param i32 i32 i32)
                    (local $key i32)
                    (local.set $key (i32.const 48))
                    (loop $more
                        (i32.store8 (i32.const 0) (local.get $key))
                        (call $put (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 1))
                        (local.set $key (i32.add (local.get $key) (i32.const 1)))
                        (br_if $more (i32.lt_u (local.get $key) (i32.const 58))))))"#,
        )
        .unwrap();
        let module = runtime.compile(&many).unwrap();
        let store = Arc::new(Store::new(1));
        let error = call(&runtime, &module, "many", &store).unwrap_err();
        assert_eq!(error.code, ErrorCode::TOO_MANY_KEYS, "{error}");
    }

    #[test]
    fn a_call_that_runs_out_of_fuel_writes_nothing() {
        let runtime = Runtime::new(RuntimeLimits {
            fuel_per_call: 10_000,
            ..RuntimeLimits::default()
        })
        .unwrap();
        // Buffers a write on every iteration until the fuel is gone.
        let writer = wat::parse_str(
            r#"(module
                (import "transdb_v1" "put" (func $put (param i32 i32 i32 i32)))
                (memory (export "memory") 1)
                (data (i32.const 0) "k")
                (func (export "transdb_alloc") (param i32) (result i32) (i32.const 1024))
                (func (export "transdb_proc_write") (param i32 i32 i32)
                    (loop $more
                        (call $put (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 1))
                        (br $more))))"#,
        )
        .unwrap();
        let module = runtime.compile(&writer).unwrap();
        let store = Arc::new(Store::new(1));
        let error = call(&runtime, &module, "write", &store).unwrap_err();
        assert_eq!(error.code, ErrorCode::OUT_OF_FUEL, "{error}");
        assert_eq!(store.get("k"), None, "nothing written by the failed call");
    }
}
