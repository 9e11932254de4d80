//! The durable identity registry: which certificate belongs to which
//! container (reference `identity.md` §9).
//!
//! [`store`] is the redb file and its contract; the registry actor that owns
//! it (writes by message, lock-free read snapshots) builds on top.

pub mod store;

pub use store::{Entry, RegistryError, RegistryStore, SCHEMA_VERSION};
pub mod actor;
pub mod grants;
pub mod jti;
pub mod leaf;

pub use actor::{Registry, RegistryReader};
pub use leaf::{LeafState, PendingLeaf, Promotion, RetiredLeaf};
pub use store::NewEntry;
