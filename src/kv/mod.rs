//! Paged KV storage: the page pool, the CSR page table, kvsieve-owned caches and views
//! over engine-owned memory.

mod bounds;
mod cache;
pub(crate) mod pool;
pub(crate) mod seqs;
mod storage;
mod table;
mod policy;
mod view;

pub use cache::{KeepTokens, KeyBoundsRef, KvCache, MemoryStats, SeqId, SharedKvCache};
pub use table::{PageTable, PageTableRef};
pub use view::{PagedKv, PagedKvLayout};
