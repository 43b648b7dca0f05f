//! Deployed modules: deploy (validate, compile, replace atomically), list, call.
//!
//! Deploying a name that exists swaps in the new module in one step: calls already running
//! hold the old module and finish on it; calls that start afterwards get the new one. A
//! module's version is the SHA-256 of its bytes.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use transdb_proto::message::{ModuleInfo, ProcedureInfo};
use transdb_proto::{ErrorCode, ErrorResponse, abi};

use transdb_proto::message::Encoding;

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
    size_bytes: usize,
    compiled: CompiledModule,
}

impl DeployedModule {
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

/// The registry of deployed modules and the runtime that runs them.
pub struct Procedures {
    runtime: Runtime,
    modules: RwLock<HashMap<String, Arc<DeployedModule>>>,
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
            modules: RwLock::new(HashMap::new()),
            max_modules,
            deploying: parking_lot::Mutex::new(()),
        }
    }

    /// The runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Validates, compiles and installs `bytes` as module `name`, replacing any module of
    /// that name. Slow (compilation): call it off the async workers.
    pub fn deploy(&self, name: &str, bytes: &[u8]) -> Result<ModuleInfo, ErrorResponse> {
        check_name(name, true, "module")?;
        if !self.modules.read().contains_key(name) && self.modules.read().len() >= self.max_modules
        {
            return Err(too_many_modules(self.max_modules));
        }
        let compiling = self.deploying.lock();
        let compiled = self.runtime.compile(bytes)?;
        drop(compiling);
        let module = Arc::new(DeployedModule {
            name: Arc::from(name),
            version: hex(&Sha256::digest(bytes)),
            size_bytes: bytes.len(),
            compiled,
        });
        let info = module.info();
        let mut modules = self.modules.write();
        if !modules.contains_key(name) && modules.len() >= self.max_modules {
            return Err(too_many_modules(self.max_modules));
        }
        modules.insert(name.to_owned(), module);
        drop(modules);
        tracing::info!(module = name, version = %info.version, procedures = info.procedures.len(), "deployed");
        Ok(info)
    }

    /// Every deployed module, by name.
    pub fn list(&self) -> Vec<ModuleInfo> {
        let mut modules: Vec<ModuleInfo> = self
            .modules
            .read()
            .values()
            .map(|module| module.info())
            .collect();
        modules.sort_by(|a, b| a.name.cmp(&b.name));
        modules
    }

    /// The module deployed as `name` right now.
    pub fn module(&self, name: &str) -> Result<Arc<DeployedModule>, ErrorResponse> {
        self.modules.read().get(name).cloned().ok_or_else(|| {
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
        check_name(module, true, "module")?;
        check_name(procedure, false, "procedure")?;
        let deployed = self.module(module)?;
        self.runtime.prepare(
            &deployed.name,
            &deployed.compiled,
            procedure,
            encoding,
            args,
            store,
        )
    }
}

fn check_name(name: &str, allow_dash: bool, what: &str) -> Result<(), ErrorResponse> {
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
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
