//! The store contract suite (placeholder; being written).
