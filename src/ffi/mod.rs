//! The C ABI (see include/kvsieve.h).
