//! The SQLite store (placeholder; being written).
