//! Deployed modules: deploy (validate, compile, replace atomically), list, call.
//!
//! Deploying a name that exists swaps in the new module in one step: calls already running
//! hold the old module and finish on it; calls that start afterwards get the new one. A
//! module's version is the SHA-256 of its bytes. (The executor orders a deploy like a
//! transaction, and a call whose module was replaced between its preparation and its
//! position is prepared again, so that which version a call runs follows the order.)

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use transdb_proto::message::{ModuleInfo, ProcedureInfo};
use transdb_proto::{ErrorCode, ErrorResponse, abi};

use transdb_proto::message::Encoding;

use crate::hex;
use crate::lock_manager::Position;
use crate::runtime::{CompiledModule, PreparedCall, Runtime};
use crate::store::Store;

/// Default limit on the number of deployed modules.
pub const DEFAULT_MAX_MODULES: usize = 100;

/// How many times a call without a key function is reconnoitred and run before it fails
/// with `KEY_SET_UNSTABLE`: each failed attempt means another transaction changed, between
/// reconnaissance and execution, which keys this one touches.
pub const MAX_RECONNAISSANCE_ATTEMPTS: usize = 5;

/// The error after [`MAX_RECONNAISSANCE_ATTEMPTS`] failed attempts.
pub fn key_set_unstable(attempts: usize) -> ErrorResponse {
    ErrorResponse::new(
        ErrorCode::KEY_SET_UNSTABLE,
        format!(
            "the procedure touched keys its reconnaissance had not seen, {attempts} times in a row \
             (other transactions keep changing them): nothing was written; retry, or give it a key function"
        ),
    )
}

/// A deployed module.
pub struct DeployedModule {
    name: Arc<str>,
    version: String,
    digest: [u8; 32],
    size_bytes: usize,
    compiled: CompiledModule,
}

impl DeployedModule {
    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SHA-256 of its bytes: its version.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// What `transdb procedures` shows.
    pub fn info(&self) -> ModuleInfo {
        ModuleInfo {
            name: self.name.to_string(),
            version: self.version.clone(),
            size_bytes: self.size_bytes as u64,
            procedures: self
                .compiled
                .procedures
                .iter()
                .map(|(name, export)| ProcedureInfo {
                    name: name.clone(),
                    declares_keys: export.declares_keys,
                })
                .collect(),
        }
    }
}

#[derive(Default)]
struct Modules {
    by_name: HashMap<String, Arc<DeployedModule>>,
    /// The position of the latest install in the order.
    last_install: Option<Position>,
}

/// The registry of deployed modules and the runtime that runs them.
pub struct Procedures {
    runtime: Runtime,
    modules: RwLock<Modules>,
    max_modules: usize,
    /// Deploys compile one at a time: compiling is CPU- and memory-heavy, and a burst of
    /// uploads must not take every core (or every instance slot) from calls.
    deploying: parking_lot::Mutex<()>,
}

impl Procedures {
    /// An empty registry.
    pub fn new(runtime: Runtime, max_modules: usize) -> Self {
        Self {
            runtime,
            modules: RwLock::new(Modules::default()),
            max_modules,
            deploying: parking_lot::Mutex::new(()),
        }
    }

    /// The runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Validates, compiles and installs `bytes` as module `name`, replacing any module of
    /// that name, outside the order (for tests and tools that own the registry; a server
    /// deploys through the executor, which orders and logs it). Slow: call it off the async
    /// workers.
    pub fn deploy(&self, name: &str, bytes: &[u8]) -> Result<ModuleInfo, ErrorResponse> {
        let module = self.compile(name, bytes)?;
        self.insert(module, None)
    }

    /// First half of a deploy: validates and compiles `bytes` as module `name`, installing
    /// nothing. Slow: call it off the async workers.
    pub fn compile(&self, name: &str, bytes: &[u8]) -> Result<Arc<DeployedModule>, ErrorResponse> {
        check_name(name, true, "module")?;
        let modules = self.modules.read();
        let full = !modules.by_name.contains_key(name) && modules.by_name.len() >= self.max_modules;
        drop(modules);
        if full {
            return Err(too_many_modules(self.max_modules));
        }
        self.compile_module(name, bytes)
    }

    /// [`Procedures::compile`] without the early check of the module limit (the install at
    /// the deploy's position checks it; a replay compiles ahead of that position).
    pub fn compile_module(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<Arc<DeployedModule>, ErrorResponse> {
        check_name(name, true, "module")?;
        let compiling = self.deploying.lock();
        let compiled = self.runtime.compile(bytes)?;
        drop(compiling);
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        Ok(Arc::new(DeployedModule {
            name: Arc::from(name),
            version: hex(&digest),
            digest,
            size_bytes: bytes.len(),
            compiled,
        }))
    }

    /// Second half of a deploy: installs a compiled module under its name, replacing any
    /// module of that name, as the transaction at `position` (which holds every lock).
    pub fn install(
        &self,
        module: Arc<DeployedModule>,
        position: Position,
    ) -> Result<ModuleInfo, ErrorResponse> {
        self.insert(module, Some(position))
    }

    fn insert(
        &self,
        module: Arc<DeployedModule>,
        position: Option<Position>,
    ) -> Result<ModuleInfo, ErrorResponse> {
        let info = module.info();
        let mut modules = self.modules.write();
        if !modules.by_name.contains_key(&*module.name) && modules.by_name.len() >= self.max_modules
        {
            return Err(too_many_modules(self.max_modules));
        }
        modules.by_name.insert(module.name.to_string(), module);
        if position.is_some() {
            modules.last_install = position;
        }
        drop(modules);
        tracing::info!(module = %info.name, version = %info.version, procedures = info.procedures.len(), "deployed");
        Ok(info)
    }

    /// Removes module `name` as the transaction at `position` (which holds every lock);
    /// returns whether it was deployed.
    pub fn uninstall(&self, name: &str, position: Position) -> bool {
        let mut modules = self.modules.write();
        let existed = modules.by_name.remove(name).is_some();
        modules.last_install = Some(position);
        drop(modules);
        if existed {
            tracing::info!(module = %name, "undeployed");
        }
        existed
    }

    /// Installs a module loaded from a checkpoint (recovery, before anything is ordered).
    pub fn restore(&self, module: Arc<DeployedModule>) {
        let name = module.name.to_string();
        self.modules.write().by_name.insert(name, module);
    }

    /// The version (digest) of every deployed module, by name, in name order, and the
    /// position of the latest install (a checkpoint at `S` may use the list only if that is
    /// below `S`).
    pub fn versions(&self) -> (Vec<(String, [u8; 32])>, Option<Position>) {
        let modules = self.modules.read();
        let mut versions: Vec<_> = modules
            .by_name
            .iter()
            .map(|(name, module)| (name.clone(), module.digest))
            .collect();
        versions.sort();
        (versions, modules.last_install)
    }

    /// The version of the module deployed as `name` right now.
    pub fn current_digest(&self, name: &str) -> Option<[u8; 32]> {
        self.modules
            .read()
            .by_name
            .get(name)
            .map(|module| module.digest)
    }

    /// Every deployed module, by name.
    pub fn list(&self) -> Vec<ModuleInfo> {
        let mut modules: Vec<ModuleInfo> = self
            .modules
            .read()
            .by_name
            .values()
            .map(|module| module.info())
            .collect();
        modules.sort_by(|a, b| a.name.cmp(&b.name));
        modules
    }

    /// The module deployed as `name` right now (`INVALID_NAME` for a name no module can
    /// have).
    pub fn module(&self, name: &str) -> Result<Arc<DeployedModule>, ErrorResponse> {
        check_name(name, true, "module")?;
        self.modules.read().by_name.get(name).cloned().ok_or_else(|| {
            ErrorResponse::new(
                ErrorCode::MODULE_NOT_FOUND,
                format!("no module {name:?} is deployed: deploy it with `transdb deploy {name} FILE.wasm`"),
            )
        })
    }

    /// First half of a call (see [`Runtime::prepare`]): checks the names, takes the module
    /// deployed right now (a later replacement does not affect this call), instantiates it
    /// and runs the key function.
    pub fn prepare(
        &self,
        module: &str,
        procedure: &str,
        encoding: Encoding,
        args: &[u8],
        store: &Arc<Store>,
    ) -> Result<PreparedCall, ErrorResponse> {
        let deployed = self.module(module)?;
        self.prepare_in(&deployed, procedure, encoding, args, store, None)
    }

    /// [`Procedures::prepare`] on a given deployed module, with the key set `given` instead
    /// of a reconnaissance run when it is `Some` (see [`Runtime::prepare_with`]).
    pub fn prepare_in(
        &self,
        deployed: &DeployedModule,
        procedure: &str,
        encoding: Encoding,
        args: &[u8],
        store: &Arc<Store>,
        given: Option<crate::transaction::DeclaredKeys>,
    ) -> Result<PreparedCall, ErrorResponse> {
        check_name(procedure, false, "procedure")?;
        self.runtime.prepare_with(
            &deployed.name,
            &deployed.compiled,
            procedure,
            encoding,
            args,
            store,
            given,
        )
    }
}

pub(crate) fn check_name(name: &str, allow_dash: bool, what: &str) -> Result<(), ErrorResponse> {
    if abi::is_valid_name(name, allow_dash) {
        return Ok(());
    }
    Err(ErrorResponse::new(
        ErrorCode::INVALID_NAME,
        format!(
            "{what} name {name:?} is invalid: use 1 to 64 ASCII letters, digits and _{}, not starting with a digit",
            if allow_dash { " or -" } else { "" }
        ),
    ))
}

fn too_many_modules(limit: usize) -> ErrorResponse {
    ErrorResponse::new(
        ErrorCode::TOO_MANY_MODULES,
        format!("{limit} modules are deployed, the limit (--max-modules): replace one instead"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::RuntimeLimits;
    use crate::scheduler::Scheduler;

    /// A module whose procedure `version` returns `text`.
    fn versioned(text: &str) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module
                (import "transdb_v1" "output" (func $output (param i32 i32)))
                (memory (export "memory") 1)
                (data (i32.const 0) "{text}")
                (func (export "transdb_alloc") (param i32) (result i32) (i32.const 1024))
                (func (export "transdb_proc_version") (param i32 i32 i32)
                    (call $output (i32.const 0) (i32.const {len}))))"#,
            len = text.len()
        ))
        .unwrap()
    }

    #[test]
    fn a_replaced_module_keeps_serving_calls_that_already_hold_it() {
        let procedures = Procedures::new(Runtime::new(RuntimeLimits::default()).unwrap(), 10);
        let (scheduler, store) = (Scheduler::new(), Arc::new(Store::new(2)));
        let first = procedures.deploy("m", &versioned("one")).unwrap();
        let running = procedures
            .prepare("m", "version", Encoding::Json, b"", &store)
            .unwrap(); // a call in progress
        let second = procedures.deploy("m", &versioned("two")).unwrap();
        assert_ne!(first.version, second.version);
        assert_eq!(running.execute(&store, b"", 0).unwrap(), b"one");
        let new = procedures
            .prepare("m", "version", Encoding::Json, b"", &store)
            .unwrap();
        let _locks = scheduler.acquire_blocking(new.lock_set()).unwrap();
        assert_eq!(new.execute(&store, b"", 1).unwrap(), b"two");
        assert_eq!(procedures.list().len(), 1);
    }

    #[test]
    fn the_module_limit_counts_names_not_versions() {
        let procedures = Procedures::new(Runtime::new(RuntimeLimits::default()).unwrap(), 1);
        procedures.deploy("a", &versioned("1")).unwrap();
        procedures.deploy("a", &versioned("2")).unwrap();
        let error = procedures.deploy("b", &versioned("3")).unwrap_err();
        assert_eq!(error.code, ErrorCode::TOO_MANY_MODULES);
    }
}
