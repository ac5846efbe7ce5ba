//! Cross-node locks on shared storage (placeholder; see issue 3).
