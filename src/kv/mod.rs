//! Paged KV storage: the page pool, the CSR page table, kvsieve-owned caches and views
//! over engine-owned memory.

mod bounds;
mod cache;
pub(crate) mod plan;
pub(crate) mod pool;
pub(crate) mod seqs;
mod storage;
mod table;
mod view;

pub use cache::{KeyBoundsRef, KvCache, MemoryStats, SharedKvCache};
pub use plan::KeepTokens;
pub use seqs::SeqId;
pub use table::{PageTable, PageTableRef};
pub use view::{PagedKv, PagedKvLayout};
