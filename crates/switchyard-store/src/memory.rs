//! The in-memory store (placeholder; being written).
