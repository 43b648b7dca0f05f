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

use crate::runtime::{CompiledModule, Runtime};
use crate::store::Store;

/// Default limit on the number of deployed modules.
pub const DEFAULT_MAX_MODULES: usize = 100;

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
}

impl Procedures {
    /// An empty registry.
    pub fn new(runtime: Runtime, max_modules: usize) -> Self {
        Self {
            runtime,
            modules: RwLock::new(HashMap::new()),
            max_modules,
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
        let compiled = self.runtime.compile(bytes)?;
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

    /// Calls `procedure` of module `module` as one transaction.
    pub fn call(
        &self,
        module: &str,
        procedure: &str,
        encoding: Encoding,
        args: &[u8],
        store: &Arc<Store>,
    ) -> Result<Vec<u8>, ErrorResponse> {
        check_name(module, true, "module")?;
        check_name(procedure, false, "procedure")?;
        let deployed = self.module(module)?;
        self.runtime.call(
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
